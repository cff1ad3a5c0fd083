//! The dispatcher: moves queued jobs from Postgres into the Redis streams of
//! their lanes (a model, and whether a job needs T5: see `flowfarm_queue::lane`),
//! a bounded window ahead of the free capacity of the workers serving each
//! lane. A job no active worker can serve stays queued, where GetQueueStats
//! shows it as waiting for a worker.
//!
//! Postgres commits first, then the messages go out. If Redis is away at
//! that moment, or loses its data later, the jobs stay `dispatched` without
//! a message until `queue.redispatch_after_seconds` passes, and are then
//! dispatched again; a duplicate message is refused at StartJob. Several
//! coordinators may run it on one database: rows are claimed with
//! SKIP LOCKED, so no job is dispatched twice at once.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use flowfarm_core::TextEncoderSet;
use flowfarm_queue::{lane, JobMessage, JobQueue, QueueError};
use flowfarm_store::{JobRow, StoreError};
use tokio::sync::Notify;

use crate::Coordinator;

/// Largest number of jobs moved per lane in one pass.
const MAX_PER_PASS: u32 = 2000;
/// Shortest time between two passes: under load every completion wakes the
/// dispatcher, and one pass per wake would cost more than the jobs it moves.
const MIN_GAP: Duration = Duration::from_millis(2);

/// Why a dispatch pass stopped.
#[derive(Debug, thiserror::Error)]
pub enum DispatchError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Queue(#[from] QueueError),
}

/// What one pass did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DispatchReport {
    pub dispatched: usize,
    pub redispatched: usize,
    pub swept: u64,
}

/// The dispatcher of one coordinator.
#[derive(Debug, Clone)]
pub struct Dispatcher {
    coordinator: Coordinator,
    queue: Arc<dyn JobQueue>,
}

impl Dispatcher {
    /// Dispatches into `queue`: Redis Streams across machines, or the
    /// in-process queue when the workers share this process.
    pub fn new(coordinator: Coordinator, queue: Arc<dyn JobQueue>) -> Self {
        Dispatcher { coordinator, queue }
    }

    fn wake(&self) -> Arc<Notify> {
        self.coordinator.shared.dispatch_wake.clone()
    }

    /// Fills each model's windows, the lane whose best job has the higher
    /// priority first (T5 first on a tie: fewer workers can take those).
    /// The model's window (every worker serves CLIP-only jobs, so it counts
    /// every job of the model out) bounds both lanes together; the T5 lane
    /// is bounded by its own too. As slots free one at a time, each goes to
    /// the best job of either lane. Returns how many jobs went out.
    ///
    /// # Errors
    /// [`DispatchError`] from Postgres or Redis; what was committed stays
    /// and is dispatched again later if its messages were not sent.
    pub async fn dispatch_ready(&self) -> Result<usize, DispatchError> {
        let shared = &self.coordinator.shared;
        let lookahead = shared.queue.lookahead_per_worker;
        let mut sent = 0;
        for model in shared.registry.names() {
            let mut heads = shared.store.lane_heads(model).await?;
            if heads.is_empty() {
                continue;
            }
            let mut model_window = shared.store.dispatch_window(model, TextEncoderSet::ClipOnly, lookahead).await?;
            // Highest priority first; on a tie T5 (All sorts before ClipOnly).
            heads.sort_by_key(|&(set, priority)| (std::cmp::Reverse(priority), set != TextEncoderSet::All));
            for (set, _) in heads {
                let window = match set {
                    TextEncoderSet::All => shared.store.dispatch_window(model, set, lookahead).await?.min(model_window),
                    TextEncoderSet::ClipOnly => model_window,
                };
                if window == 0 {
                    continue;
                }
                let jobs = shared.store.dispatch_jobs(model, set, window.min(MAX_PER_PASS), "dispatcher").await?;
                self.publish(&jobs).await?;
                shared.metrics.dispatched.inc_by(jobs.len() as u64);
                model_window = model_window.saturating_sub(jobs.len() as u32);
                sent += jobs.len();
            }
        }
        Ok(sent)
    }

    /// Dispatches again what was not started in time, and sweeps messages
    /// whose reader died.
    ///
    /// # Errors
    /// As [`Dispatcher::dispatch_ready`].
    pub async fn recover_lost(&self) -> Result<(usize, u64), DispatchError> {
        let shared = &self.coordinator.shared;
        let after = Duration::from_secs_f64(shared.queue.redispatch_after_seconds);
        let stale = shared.store.redispatch_stale(after, MAX_PER_PASS, "dispatcher").await?;
        if !stale.is_empty() {
            tracing::warn!(jobs = stale.len(), "dispatching again jobs not started in time (lost messages?)");
        }
        self.publish(&stale).await?;
        shared.metrics.redispatched.inc_by(stale.len() as u64);
        let mut swept = 0;
        for model in shared.registry.names() {
            for needs_t5 in [true, false] {
                swept += self.queue.sweep_pending(&lane(model, needs_t5), after).await?;
            }
        }
        Ok((stale.len(), swept))
    }

    async fn publish(&self, jobs: &[JobRow]) -> Result<(), QueueError> {
        let mut by_lane: BTreeMap<String, Vec<JobMessage>> = BTreeMap::new();
        for job in jobs {
            let needs_t5 = job.spec.text_encoders == TextEncoderSet::All;
            by_lane.entry(lane(&job.spec.model, needs_t5)).or_default().push(JobMessage { job_id: job.id, attempt: job.attempt });
        }
        for (lane, messages) in by_lane {
            self.queue.publish(&lane, &messages).await?;
        }
        Ok(())
    }

    /// Runs until `shutdown` is cancelled: a pass whenever this coordinator
    /// wakes it (submission, finished job, new worker, resume) or every
    /// `queue.dispatch_interval_seconds`; recovery every
    /// `queue.redispatch_after_seconds / 4`. Errors are logged and the next
    /// pass tries again.
    pub async fn run(self, shutdown: tokio_util::sync::CancellationToken) {
        let shared = &self.coordinator.shared;
        let interval = Duration::from_secs_f64(shared.queue.dispatch_interval_seconds);
        let recovery_every = Duration::from_secs_f64(shared.queue.redispatch_after_seconds / 4.0);
        let wake = self.wake();
        let mut last_recovery = Instant::now();
        let mut last_pass: Option<Instant> = None;
        let mut failing = false;
        loop {
            if let Some(gap) = last_pass.and_then(|at| MIN_GAP.checked_sub(at.elapsed())) {
                tokio::time::sleep(gap).await;
            }
            last_pass = Some(Instant::now());
            let notified = wake.notified();
            match self.dispatch_ready().await {
                Ok(_) if failing => {
                    tracing::info!("dispatching again");
                    failing = false;
                }
                Ok(_) => {}
                Err(e) => {
                    if !failing {
                        tracing::error!(error = %e, "dispatch pass failed; retrying");
                    }
                    failing = true;
                }
            }
            if last_recovery.elapsed() >= recovery_every {
                last_recovery = Instant::now();
                if let Err(e) = self.recover_lost().await {
                    tracing::error!(error = %e, "recovery pass failed; retrying");
                }
            }
            let pause = if failing { interval.max(Duration::from_millis(500)) } else { interval };
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = notified => {}
                _ = tokio::time::sleep(pause) => {}
            }
        }
    }
}
