//! The result-object sweeper: removes objects that no success recorded.
//!
//! Each attempt uploads under its own key, and a worker deletes its object
//! when the completion is refused for good; but a worker killed between its
//! upload and its report leaves the object behind, and so does a purge of a
//! job. A job that has ended keeps exactly the object its success recorded;
//! this removes the rest.
//!
//! Invariant: only objects of jobs that have ended (or no longer exist) are
//! removed, and only once older than a grace period, so an upload whose
//! report is still on its way is never taken for an orphan.

use std::time::{Duration, SystemTime};

use flowfarm_results::{ResultError, ResultStore};
use flowfarm_store::{Store, StoreError};
use uuid::Uuid;

/// How long an object stays after it was written, whatever its job.
pub const ORPHAN_GRACE: Duration = Duration::from_secs(600);

/// Why a sweep stopped.
#[derive(Debug, thiserror::Error)]
pub enum SweepError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Results(#[from] ResultError),
}

/// Sweeps the batches with a job that ended, or a purge, within `within`
/// (a purged batch may be gone): deletes their
/// objects older than `grace` that belong to an ended job without being its
/// recorded result, or to a job that no longer exists. Returns how many were
/// deleted. Safe on several coordinators at once (deletes are idempotent).
///
/// # Errors
/// [`SweepError`] from the database or the results store.
pub async fn sweep_orphans(store: &dyn Store, results: &ResultStore, within: Duration, grace: Duration) -> Result<u64, SweepError> {
    let cutoff = SystemTime::now().checked_sub(grace).unwrap_or(SystemTime::UNIX_EPOCH);
    let mut deleted = 0;
    for batch in store.batches_finished_within(within).await? {
        let jobs = store.result_keys(batch).await?;
        for (key, written) in results.list(&batch.to_string()).await? {
            if written > cutoff {
                continue;
            }
            // {batch}/{job}/a{attempt}-{worker}.png
            let Some(job) = key.split('/').nth(1).and_then(|j| Uuid::parse_str(j).ok()) else { continue };
            let orphan = match jobs.get(&job) {
                None => true,
                Some((state, recorded)) => state.is_terminal() && recorded.as_deref() != Some(key.as_str()),
            };
            if orphan {
                results.delete(&key).await?;
                tracing::info!(%key, "removed a result object no success recorded");
                deleted += 1;
            }
        }
    }
    Ok(deleted)
}

/// Runs [`sweep_orphans`] every `interval` until `shutdown` resolves, over
/// the batches that ended since a little more than the interval before the
/// grace began. Errors are logged and the next pass tries again.
pub async fn run_sweeper(coordinator: crate::Coordinator, interval: Duration, shutdown: impl std::future::Future<Output = ()>) {
    let within = ORPHAN_GRACE + interval * 2;
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => return,
            _ = tick.tick() => {
                let shared = &coordinator.shared;
                if let Err(e) = sweep_orphans(shared.store.as_ref(), &shared.results, within, ORPHAN_GRACE).await {
                    tracing::warn!(error = %e, "result sweep failed; retrying next pass");
                }
            }
        }
    }
}
