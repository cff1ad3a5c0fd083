//! WatchBatch as a log, against a real Postgres: many concurrent streams
//! over small batches while simulated workers move the jobs through grouped
//! claims and completions, streams that disconnect and resume, and step
//! progress reported to one coordinator and watched on another.
//!
//! Each stream is reconciled with `job_events`: it gets every transition
//! committed after its starting point once, each job's in order, and its
//! first snapshot plus its changes equals its last snapshot and the batch.

use std::collections::HashMap;
use std::time::Duration;

use flowfarm_proto::v1 as pb;
use flowfarm_testkit::{Harness, Render};
use pb::watch_batch_event::Event;
use tokio_stream::StreamExt;
use uuid::Uuid;

const BATCHES: usize = 30;
const JOBS_PER_BATCH: usize = 2;
const WORKERS: usize = 6;

/// What one stream showed, in order.
#[derive(Debug, Default)]
struct Seen {
    first: Option<pb::Batch>,
    last: Option<pb::Batch>,
    changes: Vec<pb::JobEvent>,
    progress: usize,
    cursors: Vec<String>,
}

impl Seen {
    fn take(&mut self, message: pb::WatchBatchEvent) {
        assert!(!message.cursor.is_empty(), "every message carries a cursor");
        self.cursors.push(message.cursor);
        match message.event.expect("an event") {
            Event::Snapshot(batch) if self.first.is_none() => self.first = Some(batch),
            Event::Snapshot(batch) => self.last = Some(batch),
            Event::StateChange(change) => self.changes.push(change),
            Event::Progress(_) => self.progress += 1,
        }
    }
}

/// Watches `batch` to its end; with `resume_every`, drops the stream after
/// that many messages each time and reconnects after the last cursor.
async fn watch(mut render: Render, batch: String, resume_every: Option<usize>) -> Seen {
    let mut seen = Seen::default();
    let mut after = String::new();
    loop {
        let request = pb::WatchBatchRequest { batch_id: batch.clone(), after: after.clone() };
        let mut stream = render.watch_batch(request).await.expect("watch").into_inner();
        let mut taken = 0;
        let mut ended = true;
        while let Some(message) = stream.next().await {
            seen.take(message.expect("stream message"));
            taken += 1;
            if resume_every.is_some_and(|n| taken == n) && seen.last.is_none() {
                ended = false;
                break;
            }
        }
        if ended {
            return seen;
        }
        after = seen.cursors.last().cloned().expect("a cursor to resume after");
    }
}

fn count(counts: &pb::JobCounts, state: pb::JobState) -> u64 {
    match state {
        pb::JobState::Queued => counts.queued,
        pb::JobState::Dispatched => counts.dispatched,
        pb::JobState::Running => counts.running,
        pb::JobState::Succeeded => counts.succeeded,
        pb::JobState::Failed => counts.failed,
        pb::JobState::Cancelled => counts.cancelled,
        pb::JobState::Dead => counts.dead,
        pb::JobState::Unspecified => panic!("no such state"),
    }
}

fn counts_vec(counts: &pb::JobCounts) -> Vec<u64> {
    [
        pb::JobState::Queued,
        pb::JobState::Dispatched,
        pb::JobState::Running,
        pb::JobState::Succeeded,
        pb::JobState::Failed,
        pb::JobState::Cancelled,
        pb::JobState::Dead,
    ]
    .iter()
    .map(|&s| count(counts, s))
    .collect()
}

fn apply(counts: &mut [u64], change: &pb::JobEvent) {
    let index = |state: i32| (state - 1) as usize;
    if change.from_state != pb::JobState::Unspecified as i32 {
        counts[index(change.from_state)] -= 1;
    }
    counts[index(change.to_state)] += 1;
}

/// Simulated workers: claim what the test dispatches with StartJobs, report
/// two steps, complete with CompleteJobs, all through the gRPC API so the
/// coordinator groups concurrent calls into shared statements.
async fn run_workers(h: &Harness, jobs: tokio::sync::mpsc::Receiver<Uuid>) {
    let jobs = std::sync::Arc::new(tokio::sync::Mutex::new(jobs));
    let mut tasks = Vec::new();
    for i in 0..WORKERS {
        let mut w = h.worker();
        let jobs = jobs.clone();
        let worker_id = w
            .register_worker(pb::RegisterWorkerRequest {
                name: format!("sim-{i}"),
                hostname: "test".into(),
                models: vec!["sd3".into()],
                text_encoder_sets: vec![pb::TextEncoderSet::All as i32],
                capacity: 4,
                ..Default::default()
            })
            .await
            .expect("register")
            .into_inner()
            .worker_id;
        tasks.push(tokio::spawn(async move {
            loop {
                let mut take = Vec::new();
                {
                    let mut rx = jobs.lock().await;
                    match rx.recv().await {
                        Some(id) => take.push(id),
                        None => return,
                    }
                    while take.len() < 3 {
                        match rx.try_recv() {
                            Ok(id) => take.push(id),
                            Err(_) => break,
                        }
                    }
                }
                let started = w
                    .start_jobs(pb::StartJobsRequest { worker_id: worker_id.clone(), job_ids: take.iter().map(Uuid::to_string).collect() })
                    .await
                    .expect("start jobs")
                    .into_inner();
                let mut completed = Vec::new();
                for outcome in started.outcomes {
                    let Some(pb::start_job_outcome::Outcome::Started(start)) = outcome.outcome else { continue };
                    let job = start.job.expect("job");
                    for step in 1..=2 {
                        w.report_progress(pb::ReportProgressRequest {
                            worker_id: worker_id.clone(),
                            job_id: job.id.clone(),
                            attempt: start.attempt,
                            step,
                            total_steps: 2,
                        })
                        .await
                        .expect("progress");
                    }
                    completed.push(pb::CompletedJob {
                        job_id: job.id.clone(),
                        attempt: start.attempt,
                        result: Some(pb::JobResult {
                            key: format!("{}/{}.png", job.batch_id, job.id),
                            sha256: "0".repeat(64),
                            size_bytes: 1,
                            content_type: "image/png".into(),
                            ..Default::default()
                        }),
                        gpu_seconds: 0.01,
                    });
                }
                if !completed.is_empty() {
                    let answer = w
                        .complete_jobs(pb::CompleteJobsRequest { worker_id: worker_id.clone(), jobs: completed })
                        .await
                        .expect("complete jobs")
                        .into_inner();
                    assert!(answer.outcomes.iter().all(|o| o.refused.is_none()), "{answer:?}");
                }
            }
        }));
    }
    for task in tasks {
        task.await.expect("worker task");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sixty_streams_and_resumed_ones_reconcile_with_job_events() {
    let h = Harness::start().await;
    let mut render = h.render();
    let mut batches = Vec::new();
    for b in 0..BATCHES {
        let specs = (0..JOBS_PER_BATCH)
            .map(|j| pb::JobSpec { model: "sd3".into(), prompt: format!("batch {b} job {j}"), steps: 2, ..Default::default() })
            .collect();
        let batch = render
            .submit_batch(pb::SubmitBatchRequest { jobs: specs, ..Default::default() })
            .await
            .expect("submit")
            .into_inner()
            .batch
            .expect("batch");
        batches.push(batch.id);
    }

    // Two plain streams per batch (60 in all), and one that drops and
    // resumes every 2 messages on a third of the batches.
    let mut watchers = Vec::new();
    for batch in &batches {
        for _ in 0..2 {
            watchers.push((batch.clone(), false, tokio::spawn(watch(h.render(), batch.clone(), None))));
        }
    }
    for batch in batches.iter().step_by(3) {
        watchers.push((batch.clone(), true, tokio::spawn(watch(h.render(), batch.clone(), Some(2)))));
    }
    // Give the streams time to take their first snapshot before anything moves.
    tokio::time::sleep(Duration::from_millis(500)).await;

    let (tx, rx) = tokio::sync::mpsc::channel(1024);
    let store = h.db.store.clone();
    let dispatcher = tokio::spawn(async move {
        let mut sent = 0;
        while sent < BATCHES * JOBS_PER_BATCH {
            // Several small dispatch statements at once, so commits interleave.
            let rounds = (0..3).map(|_| store.dispatch_jobs("sd3", flowfarm_core::TextEncoderSet::All, 4, "test"));
            for jobs in futures::future::join_all(rounds).await {
                for job in jobs.expect("dispatch") {
                    tx.send(job.id).await.expect("send");
                    sent += 1;
                }
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
    run_workers(&h, rx).await;
    dispatcher.await.expect("dispatcher");

    let mut streams = 0;
    let mut resumed = 0;
    let mut progress_seen = 0;
    for (batch, resumes, watcher) in watchers {
        let seen = tokio::time::timeout(Duration::from_secs(60), watcher).await.expect("stream ended").expect("watcher");
        let batch_id = Uuid::parse_str(&batch).unwrap();
        let first = seen.first.as_ref().expect("a first snapshot");
        let last = seen.last.as_ref().expect("a last snapshot");
        // First snapshot + every change = last snapshot = the batch now.
        let mut counts = counts_vec(first.counts.as_ref().unwrap());
        for change in &seen.changes {
            apply(&mut counts, change);
        }
        assert_eq!(counts, counts_vec(last.counts.as_ref().unwrap()), "batch {batch}: snapshot + changes = last snapshot");
        let now = h.db.store.get_batch(batch_id).await.unwrap().counts;
        assert_eq!(counts[3], now.succeeded);
        assert_eq!(counts.iter().sum::<u64>(), JOBS_PER_BATCH as u64);

        // Per job: the changes are exactly the job's events after its
        // creation, once each, in order (every stream started before any move).
        let mut by_job: HashMap<String, Vec<u64>> = HashMap::new();
        for change in &seen.changes {
            by_job.entry(change.job_id.clone()).or_default().push(change.id);
        }
        for job in
            h.db.store.list_jobs(&flowfarm_store::JobFilter { batch_id: Some(batch_id), ..Default::default() }, None, 100).await.unwrap()
        {
            let events: Vec<u64> = h.db.store.job_events(job.id).await.unwrap().iter().skip(1).map(|e| e.id as u64).collect();
            assert_eq!(
                by_job.get(&job.id.to_string()).cloned().unwrap_or_default(),
                events,
                "job {}: every transition once, in order",
                job.id
            );
        }
        let last_change = seen.changes.last().expect("changes");
        assert_eq!(last_change.to_state, pb::JobState::Succeeded as i32, "the last transition comes before the stream ends");
        streams += 1;
        resumed += usize::from(resumes);
        progress_seen += seen.progress;
    }
    assert_eq!(streams, 2 * BATCHES + BATCHES.div_ceil(3));
    assert!(resumed >= 10);
    assert!(progress_seen > 0, "step progress reaches the streams through the store's notifications");
    h.stop().await;
}

#[tokio::test]
async fn a_cursor_from_elsewhere_is_refused_naming_the_field() {
    let h = Harness::start().await;
    let mut render = h.render();
    let batch = render
        .submit_batch(pb::SubmitBatchRequest {
            jobs: vec![pb::JobSpec { model: "sd3".into(), prompt: "p".into(), ..Default::default() }],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .batch
        .unwrap();
    for after in ["42", "x:y:", "1:2:/3:4:/-5"] {
        let err = render.watch_batch(pb::WatchBatchRequest { batch_id: batch.id.clone(), after: after.into() }).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{after}");
        assert!(err.message().starts_with("after:"), "{}", err.message());
    }
    h.stop().await;
}
