//! The worker fleet: registration, heartbeats, operator states, lost workers.

use std::time::Duration;

use chrono::{DateTime, Utc};
use flowfarm_core::{TextEncoderSet, WorkerState};
use sqlx::{Postgres, QueryBuilder, Row};
use uuid::Uuid;

use crate::jobs::{take_back, TakenBack};
use crate::{JobRow, PgStore, StoreError, WorkerRow};

const WORKER_COLUMNS: &str =
    "w.id, w.name, w.hostname, w.state, w.devices, w.models, w.model_hashes, w.placements, w.text_encoder_sets, w.capacity, \
    w.version, w.images_done, w.gpu_seconds, w.registered_at, w.last_heartbeat_at, \
    ARRAY(SELECT j.id FROM jobs j WHERE j.worker_id = w.id AND j.state = 'running' ORDER BY j.id) AS current_job_ids";

/// A worker announcing itself.
#[derive(Debug, Clone)]
pub struct NewWorker {
    pub name: String,
    pub hostname: String,
    /// `[{"name": …, "memory_bytes": …}]`
    pub devices: serde_json::Value,
    pub models: Vec<String>,
    /// Model name → identity of the weights it serves it with.
    pub model_hashes: std::collections::BTreeMap<String, String>,
    /// Model name → how the worker serves it on its devices
    /// (`{"parallel": …, "units": […], "encoders": …, "max_batch": …}`).
    pub placements: serde_json::Value,
    pub text_encoder_sets: Vec<TextEncoderSet>,
    pub capacity: u32,
    pub version: String,
    /// The token it registered with; its reports must carry the same one.
    pub token_id: Option<Uuid>,
}

/// What a heartbeat tells the worker.
#[derive(Debug, Clone)]
pub struct HeartbeatOutcome {
    pub state: WorkerState,
    /// Jobs the worker reported running that it no longer holds.
    pub revoked: Vec<Uuid>,
    /// New expiry of the leases of the jobs it still holds.
    pub lease_expires_at: DateTime<Utc>,
    /// Jobs it held but no longer lists, taken back (requeued, or dead on
    /// their last attempt).
    pub taken_back: Vec<JobRow>,
}

/// A heartbeat's verdict on the worker from its state after the update
/// (None: no such worker): an unknown or gone worker is refused, and the
/// caller rolls the heartbeat's renewals back.
pub(crate) fn heartbeat_state(worker_id: Uuid, state: Option<&str>) -> Result<WorkerState, StoreError> {
    match state.map(WorkerState::parse) {
        None => Err(StoreError::NotFound { what: "worker", id: worker_id }),
        Some(None) => Err(StoreError::Corrupt(format!("worker state {state:?}"))),
        Some(Some(WorkerState::Gone)) => {
            Err(StoreError::WorkerUnavailable { worker_id, state: "gone".into(), why: "it deregistered; register again".into() })
        }
        Some(Some(state)) => Ok(state),
    }
}

impl PgStore {
    /// [`Store::register_worker`](crate::Store::register_worker) on Postgres.
    pub async fn register_worker(&self, worker: &NewWorker) -> Result<WorkerRow, StoreError> {
        let id = Uuid::now_v7();
        let sets: Vec<&str> = worker.text_encoder_sets.iter().map(|s| s.as_str()).collect();
        sqlx::query(
            "INSERT INTO workers (id, name, hostname, state, devices, models, text_encoder_sets, capacity, version, token_id, model_hashes, placements) \
             VALUES ($1, $2, $3, 'active', $4, $5, $6, $7, $8, $9, $10, $11)",
        )
        .bind(id)
        .bind(&worker.name)
        .bind(&worker.hostname)
        .bind(&worker.devices)
        .bind(&worker.models)
        .bind(&sets)
        .bind(worker.capacity as i32)
        .bind(&worker.version)
        .bind(worker.token_id)
        .bind(serde_json::to_value(&worker.model_hashes).unwrap_or_default())
        .bind(&worker.placements)
        .execute(&self.pool)
        .await?;
        self.get_worker(id).await
    }

    /// [`Store::worker_token`](crate::Store::worker_token) on Postgres.
    pub async fn worker_token(&self, id: Uuid) -> Result<Option<Uuid>, StoreError> {
        sqlx::query_scalar::<_, Option<Uuid>>("SELECT token_id FROM workers WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?
            .ok_or(StoreError::NotFound { what: "worker", id })
    }

    /// [`Store::get_worker`](crate::Store::get_worker) on Postgres.
    pub async fn get_worker(&self, id: Uuid) -> Result<WorkerRow, StoreError> {
        let row = sqlx::query(&format!("SELECT {WORKER_COLUMNS} FROM workers w WHERE w.id = $1"))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?
            .ok_or(StoreError::NotFound { what: "worker", id })?;
        WorkerRow::from_row(&row)
    }

    /// [`Store::list_workers`](crate::Store::list_workers) on Postgres.
    pub async fn list_workers(&self, include_gone: bool) -> Result<Vec<WorkerRow>, StoreError> {
        let rows = sqlx::query(&format!("SELECT {WORKER_COLUMNS} FROM workers w WHERE $1 OR w.state <> 'gone' ORDER BY w.id"))
            .bind(include_gone)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(WorkerRow::from_row).collect()
    }

    /// [`Store::heartbeat`](crate::Store::heartbeat) on Postgres.
    pub async fn heartbeat(
        &self,
        worker_id: Uuid,
        running: &[(Uuid, u32)],
        lease: Duration,
        grace: Duration,
    ) -> Result<HeartbeatOutcome, StoreError> {
        let ids: Vec<Uuid> = running.iter().map(|(id, _)| *id).collect();
        let attempts: Vec<i32> = running.iter().map(|(_, a)| *a as i32).collect();
        let mut tx = self.pool.begin().await?;
        // Only the listed attempts are renewed: a job the worker dropped
        // must not be kept alive by the worker's other work.
        // Job rows before the worker row, as CompleteJob takes them: the
        // other order deadlocks against a completion of this worker. An
        // unknown or gone worker returns early, rolling the renewal back.
        let lease_expires_at: DateTime<Utc> = sqlx::query_scalar(
            "WITH renewed AS (UPDATE jobs SET lease_expires_at = now() + make_interval(secs => $2) \
                FROM UNNEST($3::uuid[], $4::int4[]) AS r(id, attempt) \
                WHERE jobs.id = r.id AND jobs.attempt = r.attempt AND jobs.worker_id = $1 AND jobs.state = 'running') \
             SELECT now() + make_interval(secs => $2)",
        )
        .bind(worker_id)
        .bind(lease.as_secs_f64())
        .bind(&ids)
        .bind(&attempts)
        .fetch_one(&mut *tx)
        .await?;
        let actor = format!("worker:{worker_id}");
        let reason = "the worker no longer lists it in its heartbeats";
        let unlisted = |qb: &mut QueryBuilder<'_, Postgres>| {
            qb.push("state = 'running' AND worker_id = ").push_bind(worker_id);
            qb.push(" AND NOT (id = ANY(").push_bind(ids.clone()).push("))");
            qb.push(" AND started_at < now() - make_interval(secs => ").push_bind(grace.as_secs_f64()).push(")");
        };
        let why = TakenBack { actor: &actor, retry: reason, last: reason };
        let taken_back = take_back(&mut tx, unlisted, why, self.backoff, false).await?;
        let state: Option<String> = sqlx::query_scalar(
            "UPDATE workers SET last_heartbeat_at = now(), \
                 state = CASE WHEN state = 'lost' THEN 'active' ELSE state END \
             WHERE id = $1 RETURNING state",
        )
        .bind(worker_id)
        .fetch_optional(&mut *tx)
        .await?;
        let state = heartbeat_state(worker_id, state.as_deref())?;
        let revoked: Vec<Uuid> = sqlx::query_scalar(
            "SELECT r.id FROM UNNEST($2::uuid[], $3::int4[]) AS r(id, attempt) \
             LEFT JOIN jobs j ON j.id = r.id AND j.attempt = r.attempt AND j.worker_id = $1 AND j.state = 'running' \
             WHERE j.id IS NULL ORDER BY r.id",
        )
        .bind(worker_id)
        .bind(&ids)
        .bind(&attempts)
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(HeartbeatOutcome { state, revoked, lease_expires_at, taken_back })
    }

    /// [`Store::set_worker_devices`](crate::Store::set_worker_devices) on Postgres.
    pub async fn set_worker_devices(&self, worker_id: Uuid, devices: &serde_json::Value) -> Result<(), StoreError> {
        let updated = sqlx::query("UPDATE workers SET devices = $2 WHERE id = $1")
            .bind(worker_id)
            .bind(devices)
            .execute(&self.pool)
            .await?
            .rows_affected();
        if updated == 0 {
            return Err(StoreError::NotFound { what: "worker", id: worker_id });
        }
        Ok(())
    }

    /// [`Store::set_worker_state`](crate::Store::set_worker_state) on Postgres.
    pub async fn set_worker_state(&self, worker_id: Uuid, state: WorkerState) -> Result<WorkerRow, StoreError> {
        // The states each target may be reached from, checked by the UPDATE
        // itself: a drain racing a deregistration cannot bring a gone worker back.
        let from: &[&str] = match state {
            WorkerState::Gone => &["active", "draining", "cordoned", "lost"],
            // A draining worker is on its way out; cordon or uncordon cannot stop that.
            WorkerState::Active | WorkerState::Cordoned => &["active", "cordoned"],
            WorkerState::Draining => &["active", "cordoned", "draining"],
            WorkerState::Lost => &["active", "draining", "cordoned"],
        };
        let moved = sqlx::query("UPDATE workers SET state = $2 WHERE id = $1 AND state = ANY($3)")
            .bind(worker_id)
            .bind(state.as_str())
            .bind(from)
            .execute(&self.pool)
            .await?
            .rows_affected();
        let current = self.get_worker(worker_id).await?;
        if moved == 0 {
            return Err(StoreError::WorkerUnavailable {
                worker_id,
                state: current.state.as_str().into(),
                why: format!("cannot become {}", state.as_str()),
            });
        }
        Ok(current)
    }

    /// [`Store::mark_lost_workers`](crate::Store::mark_lost_workers) on Postgres.
    pub async fn mark_lost_workers(&self, timeout: Duration) -> Result<Vec<Uuid>, StoreError> {
        let ids = sqlx::query(
            "UPDATE workers SET state = 'lost' WHERE state IN ('active', 'draining', 'cordoned') \
             AND last_heartbeat_at < now() - make_interval(secs => $1) RETURNING id",
        )
        .bind(timeout.as_secs_f64())
        .fetch_all(&self.pool)
        .await?;
        ids.iter().map(|row| Ok(row.try_get("id")?)).collect()
    }
}
