//! WatchBatch: a batch's state changes as a log, with step progress mixed in.
//!
//! Invariants (the store's [`LogCursor`] gives the first two):
//! - every committed state change of the batch is sent exactly once, each
//!   job's in commit order;
//! - the first snapshot's counts are those of the log position the stream
//!   starts from, so first snapshot + changes = every later snapshot;
//! - the last snapshot is sent only after the read that brought the last
//!   change, and its counts are the first snapshot's with every change applied;
//! - every message carries the cursor just after it, and a stream started
//!   with `after = cursor` continues exactly there.

use std::time::Duration;

use flowfarm_core::JobState;
use flowfarm_proto::v1 as pb;
use flowfarm_store::{BatchRow, JobCounts, JobFilter, LogCursor, Store};
use tokio::sync::{broadcast, mpsc};
use tonic::Status;
use uuid::Uuid;

use crate::convert::{batch_to_proto, event_to_proto, invalid, store_status};
use crate::Progress;

/// How often a watcher reads the log when nothing else happens.
const POLL: Duration = Duration::from_millis(200);
/// Events per log read.
const PAGE: u32 = 500;
/// Running jobs a resynchronised watcher is told about.
const RESYNC_JOBS: u32 = 1000;

type Sender = mpsc::Sender<Result<pb::WatchBatchEvent, Status>>;

/// Where a stream starts: with a snapshot, or after a client's cursor.
pub(crate) enum Start {
    Fresh,
    After(LogCursor),
}

impl Start {
    pub(crate) fn parse(after: &str) -> Result<Start, Status> {
        if after.is_empty() {
            return Ok(Start::Fresh);
        }
        LogCursor::parse(after)
            .map(Start::After)
            .ok_or_else(|| invalid("after", "not a cursor this farm issued; take `cursor` from a WatchBatch message, or leave it empty"))
    }
}

fn message(event: pb::watch_batch_event::Event, cursor: &LogCursor) -> pb::WatchBatchEvent {
    pb::WatchBatchEvent { event: Some(event), cursor: cursor.to_string() }
}

/// Opens the stream's starting point (so a missing batch fails the call
/// itself) and spawns, on `tasks`, the task that feeds `tx`.
pub(crate) async fn start(
    store: std::sync::Arc<dyn Store>,
    tasks: &tokio_util::task::TaskTracker,
    batch_id: Uuid,
    start: Start,
    progress: broadcast::Receiver<Progress>,
    tx: Sender,
) -> Result<(), Status> {
    let (batch, cursor, counts) = match start {
        Start::Fresh => {
            let (batch, cursor) = store.batch_with_cursor(batch_id).await.map_err(store_status)?;
            let counts = batch.counts;
            (batch, cursor, Some(counts))
        }
        Start::After(cursor) => (store.get_batch(batch_id).await.map_err(store_status)?, cursor, None),
    };
    let fresh = counts.is_some();
    let watcher = Watcher { store, batch, cursor, counts, tx };
    tasks.spawn(watcher.run(fresh, progress));
    Ok(())
}

struct Watcher {
    store: std::sync::Arc<dyn Store>,
    /// The batch as first read; its counts are replaced by `counts` when sent.
    batch: BatchRow,
    cursor: LogCursor,
    /// The counts as of `cursor`, once known: from the first snapshot, or
    /// (after a resume) from the first read that starts under a new snapshot.
    counts: Option<JobCounts>,
    tx: Sender,
}

/// Why a watcher stops: the batch finished, the client left, or an error was sent.
struct Stop;

impl Watcher {
    async fn run(mut self, fresh: bool, mut progress: broadcast::Receiver<Progress>) {
        if fresh && self.send_snapshot().await.is_err() {
            return;
        }
        if self.finished() {
            return;
        }
        let mut tick = tokio::time::interval(POLL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let step = tokio::select! {
                msg = progress.recv() => match msg {
                    Ok(p) if p.batch_id == self.batch.id => {
                        self.send(pb::watch_batch_event::Event::Progress(p.event)).await
                    }
                    Ok(_) => Ok(()),
                    Err(broadcast::error::RecvError::Lagged(_)) => self.resync_progress().await,
                    Err(broadcast::error::RecvError::Closed) => Err(Stop),
                },
                _ = tick.tick() => self.read_log().await,
            };
            if step.is_err() {
                return;
            }
        }
    }

    fn finished(&self) -> bool {
        self.counts.as_ref().is_some_and(|c| c.total() > 0 && c.finished() == c.total())
    }

    async fn send(&self, event: pb::watch_batch_event::Event) -> Result<(), Stop> {
        self.tx.send(Ok(message(event, &self.cursor))).await.map_err(|_| Stop)
    }

    async fn send_snapshot(&self) -> Result<(), Stop> {
        let mut batch = self.batch.clone();
        if let Some(counts) = &self.counts {
            batch.counts = *counts;
        }
        self.send(pb::watch_batch_event::Event::Snapshot(batch_to_proto(&batch))).await
    }

    async fn fail(&self, status: Status) -> Stop {
        let _ = self.tx.send(Err(status)).await;
        Stop
    }

    /// Reads the log up to a fresh snapshot, page by page; ends the stream
    /// with the last snapshot once every job is terminal.
    async fn read_log(&mut self) -> Result<(), Stop> {
        loop {
            let want_counts = self.counts.is_none();
            let page = match self.store.read_batch_log(self.batch.id, &self.cursor, PAGE, want_counts).await {
                Ok(page) => page,
                Err(e) => return Err(self.fail(store_status(e)).await),
            };
            // Counts that come with a page are those at the end of its read:
            // they already hold this read's events.
            let counts_at_end = page.counts_at_end;
            for (event, after) in page.events {
                if let Some(counts) = &mut self.counts {
                    counts.apply(event.from_state, event.to_state);
                }
                self.cursor = after;
                self.send(pb::watch_batch_event::Event::StateChange(event_to_proto(&event))).await?;
            }
            self.cursor = page.cursor;
            if let Some(counts) = counts_at_end {
                self.counts = Some(counts);
            }
            if page.read_complete {
                break;
            }
        }
        if self.finished() {
            self.send_snapshot().await?;
            return Err(Stop);
        }
        Ok(())
    }

    /// Progress messages were dropped for this watcher: tell it the current
    /// step of each running job instead, from the store.
    async fn resync_progress(&self) -> Result<(), Stop> {
        let filter = JobFilter { batch_id: Some(self.batch.id), states: vec![JobState::Running], ..Default::default() };
        let running = match self.store.list_jobs(&filter, None, RESYNC_JOBS).await {
            Ok(jobs) => jobs,
            Err(e) => return Err(self.fail(store_status(e)).await),
        };
        for job in running {
            let event =
                pb::JobProgress { job_id: job.id.to_string(), attempt: job.attempt, step: job.progress_step, total_steps: job.spec.steps };
            self.send(pb::watch_batch_event::Event::Progress(event)).await?;
        }
        Ok(())
    }
}
