//! The lease reaper: returns jobs whose lease expired to the queue (or marks
//! them dead on their last attempt) and marks silent workers lost.

use std::time::Duration;

use flowfarm_store::{Store, StoreError};

use crate::config::LeaseConfig;

/// What one pass of the reaper did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReapReport {
    pub requeued: usize,
    pub dead: usize,
    pub lost_workers: usize,
}

/// One pass: expired leases, then silent workers. Safe to run on several
/// coordinators at once (rows are claimed with SKIP LOCKED).
///
/// # Errors
/// [`StoreError`] from the database.
pub async fn reap_once(store: &dyn Store, leases: &LeaseConfig) -> Result<ReapReport, StoreError> {
    let moved = store.reap_expired_leases().await?;
    let dead = moved.iter().filter(|j| j.state == flowfarm_core::JobState::Dead).count();
    let lost = store.mark_lost_workers(Duration::from_secs(u64::from(leases.worker_timeout_seconds))).await?;
    for job in &moved {
        tracing::warn!(job = %job.id, attempt = job.attempt, state = %job.state, "lease expired");
    }
    for worker in &lost {
        tracing::warn!(worker = %worker, "worker lost: no heartbeat");
    }
    Ok(ReapReport { requeued: moved.len() - dead, dead, lost_workers: lost.len() })
}

/// Runs [`reap_once`] every `leases.reaper_interval_seconds` until
/// `shutdown` resolves, counting expired leases in the metrics and waking
/// the dispatcher for requeued jobs. Database errors are logged and retried
/// next tick.
///
/// Time nobody could renew a lease is not held against the workers: before
/// its first pass (this coordinator was away, and workers reporting to it
/// could not reach anyone) and before the first pass after the database
/// failed a pass, it gives every running job a full lease from now and
/// counts every live worker as heard from now ([`PgStore::forgive_outage`]).
pub async fn run_reaper(coordinator: crate::Coordinator, shutdown: impl std::future::Future<Output = ()>) {
    let store = coordinator.shared.store.clone();
    let leases = coordinator.shared.leases.clone();
    let mut tick = tokio::time::interval(Duration::from_secs_f64(leases.reaper_interval_seconds));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(shutdown);
    let mut outage = Outage::AtStart;
    loop {
        tokio::select! {
            _ = &mut shutdown => return,
            _ = tick.tick() => {
                if outage != Outage::None {
                    match store.forgive_outage(leases.lease()).await {
                        Ok(renewed) => {
                            if outage == Outage::Database {
                                tracing::info!(renewed, "database reachable again: leases renewed for the time it was away");
                            }
                            outage = Outage::None;
                        }
                        Err(e) => {
                            tracing::error!(error = %e, "reaper cannot reach the database");
                            outage = Outage::Database;
                            continue;
                        }
                    }
                }
                match reap_once(store.as_ref(), &leases).await {
                    Ok(report) => {
                        for _ in 0..report.requeued + report.dead {
                            coordinator.shared.metrics.failure("lease_expired");
                        }
                        if report.requeued > 0 {
                            coordinator.wake_dispatcher();
                        }
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "reaper pass failed");
                        outage = Outage::Database;
                    }
                }
            }
        }
    }
}

/// Why the next pass first renews every lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outage {
    None,
    /// This coordinator just started.
    AtStart,
    /// The last pass could not reach the database.
    Database,
}
