//! One suite for every store: the state machine, submission, leases,
//! fencing, dispatch without doubles, the event log, workers and tokens,
//! run against each implementation of [`Store`] through a [`Backend`] (River
//! runs its driver tests the same way): `postgres::` and `sqlite::` hold the
//! same tests. What only Postgres can show (a transaction held open while
//! another commits) is tested below the suite.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use flowfarm_core::{JobState, ResolvedJob, Role, TextEncoderSet, WorkerState};
use flowfarm_store::{
    Completion, FailureCause, JobCounts, JobFilter, JobResultRow, JobSelector, LogCursor, NewBatch, NewToken, NewWorker, RetryBackoff,
    SqliteStore, Store, StoreError,
};
use flowfarm_testkit::TestDb;
use uuid::Uuid;

/// A fresh store under test, and what the suite needs of it beyond the
/// trait: rows counted, and its clock moved (leases, heartbeats and
/// dispatches made old, retry holds lifted) without waiting.
#[async_trait::async_trait]
trait Backend: Send + Sync {
    fn store(&self) -> Arc<dyn Store>;
    /// The same database, with retried jobs held back by `backoff`.
    fn store_with_backoff(&self, backoff: RetryBackoff) -> Arc<dyn Store>;
    /// The single number `sql` (plain SQL every store's database reads) selects.
    async fn count(&self, sql: &str) -> i64;
    /// Every running job's lease ran out `ago`.
    async fn expire_leases(&self, ago: Duration);
    async fn age_heartbeats(&self, by: Duration);
    async fn age_dispatches(&self, by: Duration);
    /// Every job was last updated `by` earlier.
    async fn age_updates(&self, by: Duration);
    /// Every retried job may be dispatched now.
    async fn lift_retry_holds(&self);
    /// A job's retry hold and the workers that failed it.
    async fn retry_hold(&self, job: Uuid) -> (Option<DateTime<Utc>>, Vec<Uuid>);
    /// What the token table keeps in place of the secrets.
    async fn token_hashes(&self) -> Vec<Vec<u8>>;
}

struct Postgres(TestDb);

impl Postgres {
    async fn new() -> Postgres {
        Postgres(TestDb::new().await)
    }

    async fn execute(&self, sql: &str) {
        sqlx::query(sql).execute(self.0.store.pool()).await.unwrap();
    }
}

#[async_trait::async_trait]
impl Backend for Postgres {
    fn store(&self) -> Arc<dyn Store> {
        Arc::new(self.0.store.clone())
    }

    fn store_with_backoff(&self, backoff: RetryBackoff) -> Arc<dyn Store> {
        Arc::new(self.0.store.clone().with_retry_backoff(backoff))
    }

    async fn count(&self, sql: &str) -> i64 {
        sqlx::query_scalar(sql).fetch_one(self.0.store.pool()).await.unwrap()
    }

    async fn expire_leases(&self, ago: Duration) {
        self.execute(&format!("UPDATE jobs SET lease_expires_at = now() - make_interval(secs => {})", ago.as_secs_f64())).await;
    }

    async fn age_heartbeats(&self, by: Duration) {
        self.execute(&format!("UPDATE workers SET last_heartbeat_at = last_heartbeat_at - make_interval(secs => {})", by.as_secs_f64()))
            .await;
    }

    async fn age_dispatches(&self, by: Duration) {
        self.execute(&format!("UPDATE jobs SET dispatched_at = dispatched_at - make_interval(secs => {})", by.as_secs_f64())).await;
    }

    async fn age_updates(&self, by: Duration) {
        self.execute(&format!("UPDATE jobs SET updated_at = updated_at - make_interval(secs => {})", by.as_secs_f64())).await;
    }

    async fn lift_retry_holds(&self) {
        self.execute("UPDATE jobs SET not_before = NULL").await;
    }

    async fn retry_hold(&self, job: Uuid) -> (Option<DateTime<Utc>>, Vec<Uuid>) {
        sqlx::query_as("SELECT not_before, failed_workers FROM jobs WHERE id = $1").bind(job).fetch_one(self.0.store.pool()).await.unwrap()
    }

    async fn token_hashes(&self) -> Vec<Vec<u8>> {
        sqlx::query_scalar("SELECT token_hash FROM api_tokens").fetch_all(self.0.store.pool()).await.unwrap()
    }
}

/// A SQLite database in a file of its own. Instants are microseconds since
/// the epoch there, so the clock moves by arithmetic on them.
struct Sqlite {
    store: SqliteStore,
    _dir: tempfile::TempDir,
}

impl Sqlite {
    async fn new() -> Sqlite {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("farm.db")).await.unwrap();
        Sqlite { store, _dir: dir }
    }

    async fn execute(&self, sql: &str) {
        sqlx::query(sql).execute(self.store.writer()).await.unwrap();
    }
}

fn micros(d: Duration) -> i64 {
    d.as_micros() as i64
}

#[async_trait::async_trait]
impl Backend for Sqlite {
    fn store(&self) -> Arc<dyn Store> {
        Arc::new(self.store.clone())
    }

    fn store_with_backoff(&self, backoff: RetryBackoff) -> Arc<dyn Store> {
        Arc::new(self.store.clone().with_retry_backoff(backoff))
    }

    async fn count(&self, sql: &str) -> i64 {
        sqlx::query_scalar(sql).fetch_one(self.store.readers()).await.unwrap()
    }

    async fn expire_leases(&self, ago: Duration) {
        self.execute(&format!("UPDATE jobs SET lease_expires_at = {}", Utc::now().timestamp_micros() - micros(ago))).await;
    }

    async fn age_heartbeats(&self, by: Duration) {
        self.execute(&format!("UPDATE workers SET last_heartbeat_at = last_heartbeat_at - {}", micros(by))).await;
    }

    async fn age_dispatches(&self, by: Duration) {
        self.execute(&format!("UPDATE jobs SET dispatched_at = dispatched_at - {}", micros(by))).await;
    }

    async fn age_updates(&self, by: Duration) {
        self.execute(&format!("UPDATE jobs SET updated_at = updated_at - {}", micros(by))).await;
    }

    async fn lift_retry_holds(&self) {
        self.execute("UPDATE jobs SET not_before = NULL").await;
    }

    async fn retry_hold(&self, job: Uuid) -> (Option<DateTime<Utc>>, Vec<Uuid>) {
        let (hold, failed): (Option<i64>, String) = sqlx::query_as("SELECT not_before, failed_workers FROM jobs WHERE id = ?")
            .bind(job)
            .fetch_one(self.store.readers())
            .await
            .unwrap();
        (hold.map(|us| DateTime::from_timestamp_micros(us).unwrap()), serde_json::from_str(&failed).unwrap())
    }

    async fn token_hashes(&self) -> Vec<Vec<u8>> {
        sqlx::query_scalar("SELECT token_hash FROM api_tokens").fetch_all(self.store.readers()).await.unwrap()
    }
}

fn job(i: usize) -> ResolvedJob {
    ResolvedJob {
        model: "sd3".into(),
        prompt: format!("prompt {i}"),
        negative_prompt: String::new(),
        width: 1024,
        height: 1024,
        steps: 28,
        guidance: 7.0,
        seed: i as u64,
        shift: 3.0,
        text_encoders: TextEncoderSet::All,
        priority: 0,
        max_attempts: 2,
        labels: BTreeMap::from([("i".to_string(), i.to_string())]),
        tile_vae: [None, Some(true), Some(false)][i % 3],
    }
}

fn batch(key: Option<&str>, hash: u8) -> NewBatch {
    NewBatch {
        submitter: "tester".into(),
        idempotency_key: key.map(str::to_owned),
        content_hash: vec![hash; 32],
        labels: BTreeMap::new(),
        quotas: Default::default(),
    }
}

async fn submit(store: &dyn Store, n: usize) -> Uuid {
    let jobs: Vec<_> = (0..n).map(job).collect();
    store.submit_batch(&batch(None, 0), &jobs).await.unwrap().batch.id
}

async fn worker(store: &dyn Store) -> Uuid {
    named_worker(store, "w", 2).await
}

fn result(key: &str) -> JobResultRow {
    JobResultRow { key: key.into(), sha256: "0".repeat(64), size_bytes: 10, content_type: "image/png".into(), model_hash: "ab".repeat(32) }
}

async fn submit_stores_jobs_with_one_creation_event_each(backend: &dyn Backend) {
    let store = backend.store();
    let id = submit(&*store, 50).await;
    let b = store.get_batch(id).await.unwrap();
    assert_eq!((b.total_jobs, b.counts.queued), (50, 50));
    assert_eq!(backend.count("SELECT count(*) FROM job_events WHERE from_state IS NULL AND to_state = 'queued'").await, 50);
    let jobs = store.list_jobs(&JobFilter { batch_id: Some(id), ..Default::default() }, None, 100).await.unwrap();
    assert_eq!(jobs.iter().map(|j| j.index).collect::<Vec<_>>(), (0..50).collect::<Vec<_>>(), "id order is index order");
    for i in [6, 7, 8] {
        assert_eq!(jobs[i].spec, job(i), "the resolved spec round-trips, each choice of tile_vae too");
    }
}

async fn recent_batches_come_newest_first_with_the_counts_get_batch_gives(backend: &dyn Backend) {
    let store = backend.store();
    let s: &dyn Store = &*store;
    let older = submit(s, 3).await;
    let newer = submit(s, 2).await;
    let mut other = batch(None, 9);
    other.submitter = "someone-else".into();
    let theirs = s.submit_batch(&other, &[job(0)]).await.unwrap().batch.id;
    let w = worker(s).await;
    let job = s.dispatch_jobs("sd3", TextEncoderSet::All, 1, "test").await.unwrap().remove(0);
    s.start_job(job.id, w, Duration::from_secs(30)).await.unwrap();

    let all = s.recent_batches(None, 10).await.unwrap();
    assert_eq!(all.iter().map(|b| b.id).collect::<Vec<_>>(), vec![theirs, newer, older]);
    for listed in &all {
        assert_eq!(listed, &s.get_batch(listed.id).await.unwrap(), "a listed batch is what get_batch says");
    }
    let mine = s.recent_batches(Some("tester"), 10).await.unwrap();
    assert_eq!(mine.iter().map(|b| b.id).collect::<Vec<_>>(), vec![newer, older], "only the submitter's");
    assert_eq!(s.recent_batches(None, 1).await.unwrap().len(), 1, "at most the limit");
}

async fn idempotency_key_replays_or_conflicts(backend: &dyn Backend) {
    let store = backend.store();
    let jobs = vec![job(0)];
    let first = store.submit_batch(&batch(Some("k"), 1), &jobs).await.unwrap();
    let again = store.submit_batch(&batch(Some("k"), 1), &jobs).await.unwrap();
    assert!(first.created && !again.created);
    assert_eq!(first.batch.id, again.batch.id);
    let err = store.submit_batch(&batch(Some("k"), 2), &jobs).await.unwrap_err();
    assert!(matches!(err, StoreError::IdempotencyConflict { .. }), "{err}");
    assert_eq!(backend.count("SELECT count(*) FROM batches").await, 1);
    assert_eq!(backend.count("SELECT count(*) FROM jobs").await, 1);
}

async fn concurrent_replays_make_one_batch(backend: &dyn Backend) {
    let store = backend.store();
    let jobs = vec![job(0), job(1)];
    let request = batch(Some("same"), 3);
    let tries = (0..8).map(|_| store.submit_batch(&request, &jobs));
    let outcomes = futures::future::join_all(tries).await;
    let ids: HashSet<Uuid> = outcomes.into_iter().map(|o| o.unwrap().batch.id).collect();
    assert_eq!(ids.len(), 1);
    assert_eq!(backend.count("SELECT count(*) FROM jobs").await, 2);
}

async fn a_job_runs_start_progress_complete_and_completion_takes_effect_once(backend: &dyn Backend) {
    let store = backend.store();
    let s: &dyn Store = &*store;
    submit(s, 1).await;
    let w = worker(s).await;
    let job = s.dispatch_jobs("sd3", flowfarm_core::TextEncoderSet::All, 10, "test").await.unwrap().remove(0);
    assert_eq!(job.state, JobState::Dispatched);
    let lease = Duration::from_secs(30);
    let running = s.start_job(job.id, w, lease).await.unwrap();
    assert_eq!((running.state, running.attempt, running.worker_id), (JobState::Running, 1, Some(w)));
    // A claim repeated by its holder gets the same answer; another worker's
    // (a duplicate queue message) is refused.
    let again = s.start_job(job.id, w, lease).await.unwrap();
    assert_eq!((again.state, again.attempt, again.worker_id), (JobState::Running, 1, Some(w)));
    let other = named_worker(s, "other", 1).await;
    assert!(matches!(s.start_job(job.id, other, lease).await, Err(StoreError::WrongState { .. })));
    assert_eq!(backend.count("SELECT count(*) FROM job_events WHERE to_state = 'running'").await, 1, "started once");
    s.report_progress(job.id, 1, w, 14, lease).await.unwrap();
    assert_eq!(s.get_job(job.id).await.unwrap().progress_step, 14);
    s.complete_job(job.id, 1, w, &result("a.png"), 2.5).await.unwrap();
    s.complete_job(job.id, 1, w, &result("a.png"), 2.5).await.unwrap();
    let done = s.get_job(job.id).await.unwrap();
    assert_eq!(done.state, JobState::Succeeded);
    assert_eq!(done.result.unwrap().key, "a.png");
    assert_eq!(backend.count("SELECT count(*) FROM job_events WHERE to_state = 'succeeded'").await, 1);
    let wk = s.get_worker(w).await.unwrap();
    assert_eq!((wk.images_done, wk.gpu_seconds), (1, 2.5), "credited once");
    assert_eq!(wk.placements, placement(), "as registered");
    let events: Vec<_> = s.job_events(job.id).await.unwrap().iter().map(|e| e.to_state).collect();
    assert_eq!(events, vec![JobState::Queued, JobState::Dispatched, JobState::Running, JobState::Succeeded]);
}

async fn expired_lease_requeues_with_next_attempt_and_fences_the_old_one(backend: &dyn Backend) {
    let store = backend.store();
    let s: &dyn Store = &*store;
    submit(s, 1).await;
    let w = worker(s).await;
    let job = s.dispatch_jobs("sd3", flowfarm_core::TextEncoderSet::All, 1, "test").await.unwrap().remove(0);
    s.start_job(job.id, w, Duration::from_secs(30)).await.unwrap();
    // Let the lease lapse without waiting for it.
    backend.expire_leases(Duration::from_secs(1)).await;
    let moved = s.reap_expired_leases().await.unwrap();
    assert_eq!(moved.len(), 1);
    assert_eq!((moved[0].state, moved[0].attempt), (JobState::Queued, 2));
    let stale = s.report_progress(job.id, 1, w, 3, Duration::from_secs(30)).await.unwrap_err();
    assert!(matches!(stale, StoreError::WrongState { .. }), "{stale}");
    assert!(s.complete_job(job.id, 1, w, &result("x"), 0.0).await.is_err());

    // Second and last attempt (max_attempts = 2) also lapses: dead.
    s.dispatch_jobs("sd3", flowfarm_core::TextEncoderSet::All, 1, "test").await.unwrap();
    let second = s.start_job(job.id, w, Duration::from_secs(30)).await.unwrap();
    assert_eq!(second.attempt, 2);
    backend.expire_leases(Duration::from_secs(1)).await;
    let moved = s.reap_expired_leases().await.unwrap();
    assert_eq!(moved[0].state, JobState::Dead);
}

async fn retryable_failures_requeue_until_the_last_attempt_then_dead(backend: &dyn Backend) {
    let store = backend.store();
    let s: &dyn Store = &*store;
    submit(s, 2).await;
    let w = worker(s).await;
    let lease = Duration::from_secs(30);
    let jobs = s.dispatch_jobs("sd3", flowfarm_core::TextEncoderSet::All, 2, "t").await.unwrap();
    let (a, b) = (jobs[0].id, jobs[1].id);
    s.start_job(a, w, lease).await.unwrap();
    assert_eq!(s.fail_job(a, 1, w, "CUDA out of memory", FailureCause::Transient, 0.0).await.unwrap(), JobState::Queued);
    s.dispatch_jobs("sd3", flowfarm_core::TextEncoderSet::All, 1, "t").await.unwrap();
    s.start_job(a, w, lease).await.unwrap();
    assert_eq!(s.fail_job(a, 2, w, "CUDA out of memory", FailureCause::Transient, 0.0).await.unwrap(), JobState::Dead);
    assert_eq!(s.get_job(a).await.unwrap().error.as_deref(), Some("CUDA out of memory"));
    // A non-retryable error fails at once.
    s.start_job(b, w, lease).await.unwrap();
    assert_eq!(s.fail_job(b, 1, w, "prompt refused", FailureCause::BadInput, 0.0).await.unwrap(), JobState::Failed);
    // An operator retry gives one more attempt.
    let retried = s.retry_jobs(&JobSelector::Ids(vec![a, b]), "admin:x", "again").await.unwrap();
    assert_eq!(retried.len(), 2);
    let a_now = s.get_job(a).await.unwrap();
    assert_eq!((a_now.state, a_now.attempt, a_now.spec.max_attempts), (JobState::Queued, 3, 3));
}

async fn concurrent_dispatchers_never_take_the_same_job(backend: &dyn Backend) {
    let store = backend.store();
    submit(&*store, 400).await;
    let runs = (0..8).map(|i| {
        let s = store.clone();
        tokio::spawn(async move {
            let mut got = Vec::new();
            loop {
                let batch = s.dispatch_jobs("sd3", flowfarm_core::TextEncoderSet::All, 25, &format!("d{i}")).await.unwrap();
                if batch.is_empty() {
                    return got;
                }
                got.extend(batch.into_iter().map(|j| j.id));
            }
        })
    });
    let all: Vec<Uuid> = futures::future::join_all(runs).await.into_iter().flat_map(|r| r.unwrap()).collect();
    let unique: HashSet<_> = all.iter().collect();
    assert_eq!((all.len(), unique.len()), (400, 400));
}

async fn dispatch_follows_priority_and_pauses(backend: &dyn Backend) {
    let store = backend.store();
    let s: &dyn Store = &*store;
    let id = submit(s, 3).await;
    let jobs = s.list_jobs(&JobFilter { batch_id: Some(id), ..Default::default() }, None, 10).await.unwrap();
    assert_eq!(s.set_priority(&JobSelector::Ids(vec![jobs[2].id]), 10).await.unwrap(), 1);
    s.set_paused("", true, "maintenance", "admin:x").await.unwrap();
    assert!(s.dispatch_jobs("sd3", flowfarm_core::TextEncoderSet::All, 10, "t").await.unwrap().is_empty());
    s.set_paused("", false, "", "admin:x").await.unwrap();
    s.set_paused("sd3", true, "", "admin:x").await.unwrap();
    assert!(s.dispatch_jobs("sd3", flowfarm_core::TextEncoderSet::All, 10, "t").await.unwrap().is_empty());
    s.set_paused("sd3", false, "", "admin:x").await.unwrap();
    let first = s.dispatch_jobs("sd3", flowfarm_core::TextEncoderSet::All, 1, "t").await.unwrap();
    assert_eq!(first[0].id, jobs[2].id, "the raised priority goes first");
}

async fn cancel_and_purge_touch_only_what_they_may(backend: &dyn Backend) {
    let store = backend.store();
    let s: &dyn Store = &*store;
    let id = submit(s, 5).await;
    let w = worker(s).await;
    let j = s.dispatch_jobs("sd3", flowfarm_core::TextEncoderSet::All, 1, "t").await.unwrap().remove(0);
    s.start_job(j.id, w, Duration::from_secs(30)).await.unwrap();
    s.complete_job(j.id, 1, w, &result("r"), 1.0).await.unwrap();
    let cancelled = s.cancel_jobs(&JobSelector::Batch(id), "submitter:t", "no longer needed").await.unwrap();
    assert_eq!(cancelled.len(), 4, "the succeeded job stays");
    assert_eq!(backend.count("SELECT count(*) FROM job_events WHERE to_state = 'cancelled'").await, 4);
    assert_eq!(s.purge_jobs(Some(&JobSelector::Batch(id)), None).await.unwrap(), 5);
    assert_eq!(backend.count("SELECT count(*) FROM job_events").await, 0, "events go with their jobs");
    assert!(matches!(s.get_batch(id).await, Err(StoreError::NotFound { .. })), "an empty batch goes too");
}

/// A purged batch stays on the sweeper's list for a while, gone or not,
/// although none of its jobs ended lately.
async fn purged_batches_are_listed_for_the_result_sweeper(backend: &dyn Backend) {
    let store = backend.store();
    let s: &dyn Store = &*store;
    let id = submit(s, 1).await;
    s.cancel_jobs(&JobSelector::Batch(id), "t", "").await.unwrap();
    let hour = Duration::from_secs(3600);
    assert_eq!(s.batches_finished_within(hour).await.unwrap(), vec![id], "a job ended just now");
    backend.age_updates(Duration::from_secs(2 * 86400)).await;
    assert!(s.batches_finished_within(hour).await.unwrap().is_empty(), "nothing ended within the hour");
    assert_eq!(s.purge_jobs(Some(&JobSelector::Batch(id)), None).await.unwrap(), 1);
    assert!(matches!(s.get_batch(id).await, Err(StoreError::NotFound { .. })));
    assert_eq!(s.batches_finished_within(hour).await.unwrap(), vec![id], "the purge put it back on the list");
}

async fn heartbeats_renew_leases_and_name_revoked_jobs(backend: &dyn Backend) {
    let store = backend.store();
    let s: &dyn Store = &*store;
    submit(s, 2).await;
    let w = worker(s).await;
    let jobs = s.dispatch_jobs("sd3", flowfarm_core::TextEncoderSet::All, 2, "t").await.unwrap();
    let short = Duration::from_secs(1);
    for j in &jobs {
        s.start_job(j.id, w, short).await.unwrap();
    }
    s.cancel_jobs(&JobSelector::Ids(vec![jobs[1].id]), "submitter:t", "").await.unwrap();
    let beat = s.heartbeat(w, &[(jobs[0].id, 1), (jobs[1].id, 1)], Duration::from_secs(60), Duration::from_secs(60)).await.unwrap();
    assert_eq!(beat.state, WorkerState::Active);
    assert_eq!(beat.revoked, vec![jobs[1].id]);
    let kept = s.get_job(jobs[0].id).await.unwrap();
    assert!(kept.lease_expires_at.unwrap() > chrono::Utc::now() + chrono::Duration::seconds(30));

    s.set_worker_state(w, WorkerState::Cordoned).await.unwrap();
    submit(s, 1).await;
    let next = s.dispatch_jobs("sd3", flowfarm_core::TextEncoderSet::All, 1, "t").await.unwrap().remove(0);
    assert!(matches!(s.start_job(next.id, w, short).await, Err(StoreError::WorkerUnavailable { .. })));
    assert_eq!(s.get_job(next.id).await.unwrap().state, JobState::Queued, "the refused job went back to the queue");

    backend.age_heartbeats(Duration::from_secs(120)).await;
    assert_eq!(s.mark_lost_workers(Duration::from_secs(60)).await.unwrap(), vec![w]);
    assert_eq!(s.get_worker(w).await.unwrap().state, WorkerState::Lost);
}

async fn tokens_authenticate_until_revoked(backend: &dyn Backend) {
    let store = backend.store();
    let s: &dyn Store = &*store;
    let (info, secret) = s.create_token(&NewToken::new("ci", Role::Worker), [7; 32]).await.unwrap();
    assert_eq!(s.authenticate(&secret).await.unwrap(), Some(info.clone()));
    assert_eq!(s.authenticate("fft_nope").await.unwrap(), None);
    let stored = backend.token_hashes().await;
    assert_eq!(stored.len(), 1);
    assert_ne!(stored[0], secret.as_bytes(), "only the hash is stored");
    s.revoke_token(info.id).await.unwrap();
    assert_eq!(s.authenticate(&secret).await.unwrap(), None);
}

/// How the test workers serve `sd3`, as a worker registers it.
fn placement() -> serde_json::Value {
    serde_json::json!({"sd3": {"parallel": "cfg", "units": ["cpu:0+cpu:1"], "encoders": "same", "max_batch": 4}})
}

async fn named_worker(store: &dyn Store, name: &str, capacity: u32) -> Uuid {
    registered(store, name, capacity, vec![TextEncoderSet::All]).await
}

/// A worker serving `sd3` with the text-encoder `sets`.
async fn registered(store: &dyn Store, name: &str, capacity: u32, sets: Vec<TextEncoderSet>) -> Uuid {
    store
        .register_worker(&NewWorker {
            name: name.into(),
            hostname: "h".into(),
            devices: serde_json::json!([]),
            models: vec!["sd3".into()],
            model_hashes: Default::default(),
            placements: placement(),
            text_encoder_sets: sets,
            capacity,
            version: "test".into(),
            token_id: None,
        })
        .await
        .unwrap()
        .id
}

/// The dispatch window: free slots of the active workers serving the model
/// plus a lookahead per worker, less what is already out.
async fn the_dispatch_window_follows_the_fleet(backend: &dyn Backend) {
    let store = backend.store();
    let s: &dyn Store = &*store;
    submit(s, 20).await;
    assert_eq!(s.dispatch_window("sd3", flowfarm_core::TextEncoderSet::All, 2).await.unwrap(), 0, "no workers, nothing goes out");
    let a = named_worker(s, "a", 3).await;
    named_worker(s, "b", 1).await;
    assert_eq!(s.dispatch_window("sd3", flowfarm_core::TextEncoderSet::All, 2).await.unwrap(), 3 + 1 + 2 * 2);
    let out = s.dispatch_jobs("sd3", flowfarm_core::TextEncoderSet::All, 5, "t").await.unwrap();
    s.start_job(out[0].id, a, Duration::from_secs(30)).await.unwrap();
    assert_eq!(
        s.dispatch_window("sd3", flowfarm_core::TextEncoderSet::All, 2).await.unwrap(),
        8 - 5,
        "dispatched and running jobs both count"
    );
    s.set_worker_state(a, WorkerState::Cordoned).await.unwrap();
    assert_eq!(s.dispatch_window("sd3", flowfarm_core::TextEncoderSet::All, 2).await.unwrap(), 0, "a cordoned worker's slots do not count");
    assert_eq!(s.dispatch_window("other-model", flowfarm_core::TextEncoderSet::All, 2).await.unwrap(), 0);
}

/// A retried job waits out its backoff before it is dispatched again, and
/// is not started by the worker that failed it while another worker could.
async fn retries_back_off_and_go_to_another_worker(backend: &dyn Backend) {
    let store = backend.store_with_backoff(RetryBackoff { base: Duration::from_millis(600), max: Duration::from_secs(5) });
    let s: &dyn Store = &*store;
    submit(s, 1).await;
    let a = named_worker(s, "a", 1).await;
    let j = s.dispatch_jobs("sd3", flowfarm_core::TextEncoderSet::All, 1, "t").await.unwrap().remove(0);
    s.start_job(j.id, a, Duration::from_secs(30)).await.unwrap();
    assert_eq!(s.fail_job(j.id, 1, a, "out of memory", FailureCause::Transient, 0.0).await.unwrap(), JobState::Queued);
    assert!(s.dispatch_jobs("sd3", flowfarm_core::TextEncoderSet::All, 1, "t").await.unwrap().is_empty(), "held back by the backoff");
    let row = backend.retry_hold(j.id).await;
    let wait = row.0.unwrap() - chrono::Utc::now();
    assert!(wait <= chrono::Duration::milliseconds(600) && wait > chrono::Duration::milliseconds(200), "base × [0.5, 1]: {wait}");
    assert_eq!(row.1, vec![a]);

    tokio::time::sleep(Duration::from_millis(650)).await;
    // Alone, the failed worker may take it again.
    let j = s.dispatch_jobs("sd3", flowfarm_core::TextEncoderSet::All, 1, "t").await.unwrap().remove(0);
    assert_eq!(j.attempt, 2);
    let b = named_worker(s, "b", 1).await;
    // With another worker there, it declines: back to the queue, same attempt.
    assert!(matches!(s.start_job(j.id, a, Duration::from_secs(30)).await, Err(StoreError::Declined { .. })));
    let declined = s.get_job(j.id).await.unwrap();
    assert_eq!((declined.state, declined.attempt), (JobState::Queued, 2));
    backend.lift_retry_holds().await;
    let j = s.dispatch_jobs("sd3", flowfarm_core::TextEncoderSet::All, 1, "t").await.unwrap().remove(0);
    assert_eq!(s.start_job(j.id, b, Duration::from_secs(30)).await.unwrap().attempt, 2);

    // Its last attempt failing leaves it dead, with the error.
    assert_eq!(s.fail_job(j.id, 2, b, "device lost", FailureCause::Transient, 0.0).await.unwrap(), JobState::Dead);
    assert_eq!(s.get_job(j.id).await.unwrap().error.as_deref(), Some("device lost"));
}

/// A job dispatched but never started is dispatched again after the
/// timeout, with an event saying so; a started one is not.
async fn unstarted_dispatches_are_dispatched_again(backend: &dyn Backend) {
    let store = backend.store();
    let s: &dyn Store = &*store;
    submit(s, 2).await;
    let w = worker(s).await;
    let out = s.dispatch_jobs("sd3", flowfarm_core::TextEncoderSet::All, 2, "t").await.unwrap();
    s.start_job(out[0].id, w, Duration::from_secs(30)).await.unwrap();
    assert!(s.redispatch_stale(Duration::from_secs(60), 10, "t").await.unwrap().is_empty(), "not stale yet");
    backend.age_dispatches(Duration::from_secs(120)).await;
    let again = s.redispatch_stale(Duration::from_secs(60), 10, "t").await.unwrap();
    assert_eq!(again.iter().map(|j| j.id).collect::<Vec<_>>(), vec![out[1].id]);
    assert_eq!(again[0].state, JobState::Dispatched);
    assert_eq!(backend.count("SELECT count(*) FROM job_events WHERE from_state = 'dispatched' AND to_state = 'dispatched'").await, 1);
    assert!(s.redispatch_stale(Duration::from_secs(60), 10, "t").await.unwrap().is_empty(), "its clock restarted");
    // The duplicate message is refused at start to any other worker; the
    // holder gets its own claim back (it skips a job it already renders).
    s.start_job(out[1].id, w, Duration::from_secs(30)).await.unwrap();
    let other = named_worker(s, "other", 1).await;
    assert!(matches!(s.start_job(out[1].id, other, Duration::from_secs(30)).await, Err(StoreError::WrongState { .. })));
    assert_eq!(s.start_job(out[1].id, w, Duration::from_secs(30)).await.unwrap().attempt, 1);
    let starts = s.job_events(out[1].id).await.unwrap().iter().filter(|e| e.to_state == JobState::Running).count();
    assert_eq!(starts, 1, "started once");
}

/// Grouped StartJob and CompleteJob do what the single calls do, and leave
/// the calls they cannot take (duplicates, stale attempts, non-active
/// workers) for the single path to explain.
async fn grouped_starts_and_completions_match_the_single_calls(backend: &dyn Backend) {
    let store = backend.store();
    let s: &dyn Store = &*store;
    submit(s, 4).await;
    let (a, b) = (named_worker(s, "a", 4).await, named_worker(s, "b", 4).await);
    s.set_worker_state(b, WorkerState::Cordoned).await.unwrap();
    let out = s.dispatch_jobs("sd3", flowfarm_core::TextEncoderSet::All, 4, "t").await.unwrap();
    let lease = Duration::from_secs(30);
    let started =
        s.start_jobs(&[(out[0].id, a), (out[1].id, a), (out[0].id, a), (out[2].id, b), (Uuid::now_v7(), a)], lease).await.unwrap();
    let ids: Vec<Option<Uuid>> = started.iter().map(|r| r.as_ref().map(|j| j.id)).collect();
    assert_eq!(ids, vec![Some(out[0].id), Some(out[1].id), None, None, None], "duplicate, cordoned worker, unknown job: not started");
    assert_eq!(started[0].as_ref().unwrap().state, JobState::Running);
    assert_eq!(s.get_job(out[2].id).await.unwrap().state, JobState::Dispatched, "left for the single path");
    assert_eq!(backend.count("SELECT count(*) FROM job_events WHERE to_state = 'running'").await, 2);

    let done = |job: Uuid, attempt: u32| flowfarm_store::Completion {
        job_id: job,
        attempt,
        worker_id: a,
        result: result(&format!("{job}.png")),
        gpu_seconds: 2.0,
    };
    let took = s.complete_jobs(&[done(out[0].id, 1), done(out[1].id, 2), done(out[3].id, 1)]).await.unwrap();
    assert_eq!(took, vec![true, false, false], "a stale attempt and a job not running are not completed");
    assert_eq!(s.get_job(out[0].id).await.unwrap().state, JobState::Succeeded);
    assert_eq!(s.get_job(out[1].id).await.unwrap().state, JobState::Running);
    let worker = s.get_worker(a).await.unwrap();
    assert_eq!((worker.images_done, worker.gpu_seconds), (1, 2.0), "credited once");
    // A repeat through the single path is a no-op.
    s.complete_job(out[0].id, 1, a, &result(&format!("{}.png", out[0].id)), 2.0).await.unwrap();
    assert_eq!(s.get_worker(a).await.unwrap().images_done, 1);
}

/// One group holding a stale completion (attempt 1, worker a, whose lease
/// expired) and the live one (attempt 2, worker b) of the same job: each is
/// answered by its own fence, and the job is counted once.
async fn grouped_completions_answer_each_fence_on_its_own(backend: &dyn Backend) {
    let store = backend.store();
    let s: &dyn Store = &*store;
    submit(s, 1).await;
    let (a, b) = (named_worker(s, "a", 1).await, named_worker(s, "b", 1).await);
    let lease = Duration::from_secs(30);
    let job = s.dispatch_jobs("sd3", flowfarm_core::TextEncoderSet::All, 1, "t").await.unwrap().remove(0);
    s.start_job(job.id, a, lease).await.unwrap();
    backend.expire_leases(Duration::from_secs(1)).await;
    s.reap_expired_leases().await.unwrap();
    s.dispatch_jobs("sd3", flowfarm_core::TextEncoderSet::All, 1, "t").await.unwrap();
    assert_eq!(s.start_job(job.id, b, lease).await.unwrap().attempt, 2);
    let completion = |attempt: u32, worker_id: Uuid, key: &str| flowfarm_store::Completion {
        job_id: job.id,
        attempt,
        worker_id,
        result: result(key),
        gpu_seconds: 1.0,
    };
    for order in [[0usize, 1], [1, 0]] {
        let both = [completion(1, a, "stale.png"), completion(2, b, "live.png")];
        let group: Vec<_> = order.iter().map(|&i| both[i].clone()).collect();
        let took = s.complete_jobs(&group).await.unwrap();
        let by_fence: Vec<(u32, bool)> = group.iter().zip(&took).map(|(c, t)| (c.attempt, *t)).collect();
        assert!(by_fence.contains(&(1, false)), "the stale completion is not told it took effect: {by_fence:?}");
        if order == [0, 1] {
            assert!(by_fence.contains(&(2, true)), "{by_fence:?}");
        }
    }
    let done = s.get_job(job.id).await.unwrap();
    assert_eq!((done.state, done.result.unwrap().key), (JobState::Succeeded, "live.png".to_owned()));
    assert_eq!(backend.count("SELECT count(*) FROM job_events WHERE to_state = 'succeeded'").await, 1);
    assert_eq!(s.get_worker(b).await.unwrap().images_done, 1);
    assert_eq!(s.get_worker(a).await.unwrap().images_done, 0);
}

/// A heartbeat renews the attempts it lists and nothing else; a job the
/// worker holds but no longer lists goes back to the queue.
async fn heartbeats_renew_only_the_jobs_they_list(backend: &dyn Backend) {
    let store = backend.store();
    let s: &dyn Store = &*store;
    submit(s, 2).await;
    let w = worker(s).await;
    let jobs = s.dispatch_jobs("sd3", flowfarm_core::TextEncoderSet::All, 2, "t").await.unwrap();
    for j in &jobs {
        s.start_job(j.id, w, Duration::from_secs(1)).await.unwrap();
    }
    // Within the grace period an unlisted job may be a claim the heartbeat did not know of yet.
    let beat = s.heartbeat(w, &[(jobs[0].id, 1)], Duration::from_secs(60), Duration::from_secs(60)).await.unwrap();
    assert!(beat.taken_back.is_empty());
    let listed = s.get_job(jobs[0].id).await.unwrap().lease_expires_at.unwrap();
    let unlisted = s.get_job(jobs[1].id).await.unwrap().lease_expires_at.unwrap();
    assert!(listed > chrono::Utc::now() + chrono::Duration::seconds(30));
    assert!(unlisted < chrono::Utc::now() + chrono::Duration::seconds(2), "the dropped job's lease is not renewed");

    let moved = s.heartbeat(w, &[(jobs[0].id, 1)], Duration::from_secs(60), Duration::ZERO).await.unwrap().taken_back;
    assert_eq!(moved.iter().map(|j| (j.id, j.state, j.attempt)).collect::<Vec<_>>(), vec![(jobs[1].id, JobState::Queued, 2)]);
    assert_eq!(s.get_job(jobs[0].id).await.unwrap().state, JobState::Running);
}

/// Drains racing deregistrations: a gone worker stays gone.
async fn a_drain_racing_a_deregistration_cannot_bring_a_worker_back(backend: &dyn Backend) {
    let store = backend.store();
    let s: &dyn Store = &*store;
    let mut workers = Vec::new();
    for i in 0..40 {
        workers.push(named_worker(s, &format!("w{i}"), 1).await);
    }
    let races = workers.iter().map(|&w| {
        let s = store.clone();
        async move {
            let (drain, gone) = tokio::join!(s.set_worker_state(w, WorkerState::Draining), s.set_worker_state(w, WorkerState::Gone));
            gone.unwrap();
            drop(drain);
        }
    });
    futures::future::join_all(races).await;
    for w in workers {
        assert_eq!(s.get_worker(w).await.unwrap().state, WorkerState::Gone);
    }
}

/// After an outage nobody could renew leases or heartbeat: every running
/// job gets a full lease from now, every live worker counts as just heard.
async fn an_outage_is_not_held_against_leases_or_workers(backend: &dyn Backend) {
    let store = backend.store();
    let s: &dyn Store = &*store;
    submit(s, 1).await;
    let w = worker(s).await;
    let job = s.dispatch_jobs("sd3", flowfarm_core::TextEncoderSet::All, 1, "t").await.unwrap().remove(0);
    s.start_job(job.id, w, Duration::from_secs(30)).await.unwrap();
    backend.expire_leases(Duration::from_secs(5)).await;
    backend.age_heartbeats(Duration::from_secs(300)).await;
    assert_eq!(s.forgive_outage(Duration::from_secs(30)).await.unwrap(), 1);
    assert!(s.reap_expired_leases().await.unwrap().is_empty());
    assert!(s.mark_lost_workers(Duration::from_secs(60)).await.unwrap().is_empty());
    assert_eq!(s.get_job(job.id).await.unwrap().state, JobState::Running);
}

/// Reads the whole log from `cursor` on: every page of one read, then one
/// more read. Returns the events and the cursor after them.
async fn read_log(s: &dyn Store, batch: Uuid, mut cursor: LogCursor, limit: u32) -> (Vec<flowfarm_store::EventRow>, LogCursor) {
    let mut events = Vec::new();
    loop {
        let page = s.read_batch_log(batch, &cursor, limit, false).await.unwrap();
        events.extend(page.events.into_iter().map(|(e, _)| e));
        cursor = page.cursor;
        if page.read_complete {
            return (events, cursor);
        }
    }
}

/// A transition committed late behind a higher event id is still read,
/// once: ids are taken at insert, commits come in another order.
#[tokio::test]
async fn the_log_delivers_an_event_committed_behind_a_higher_id() {
    let db = TestDb::new().await;
    let s = &db.store;
    let batch = submit(s, 2).await;
    let jobs = s.list_jobs(&JobFilter { batch_id: Some(batch), ..Default::default() }, None, 10).await.unwrap();
    let (_, cursor) = s.batch_with_cursor(batch).await.unwrap();

    // A transaction moves job 0 and stays open; job 1 moves and commits after it.
    let mut slow = s.pool().begin().await.unwrap();
    sqlx::query("UPDATE jobs SET priority = 5 WHERE id = $1").bind(jobs[0].id).execute(&mut *slow).await.unwrap();
    sqlx::query(
        "INSERT INTO job_events (job_id, batch_id, from_state, to_state, attempt, actor, reason) \
         VALUES ($1, $2, 'queued', 'cancelled', 1, 'test', 'late')",
    )
    .bind(jobs[0].id)
    .bind(batch)
    .execute(&mut *slow)
    .await
    .unwrap();
    sqlx::query("UPDATE jobs SET state = 'cancelled' WHERE id = $1").bind(jobs[0].id).execute(&mut *slow).await.unwrap();
    s.cancel_jobs(&JobSelector::Ids(vec![jobs[1].id]), "t", "").await.unwrap();
    let (first, cursor) = read_log(s, batch, cursor, 100).await;
    assert_eq!(first.iter().map(|e| e.job_id).collect::<Vec<_>>(), vec![jobs[1].id], "only the committed change");

    slow.commit().await.unwrap();
    let (second, cursor) = read_log(s, batch, cursor, 100).await;
    assert_eq!(second.iter().map(|e| e.job_id).collect::<Vec<_>>(), vec![jobs[0].id], "the late commit, behind a higher id");
    assert!(second[0].id < first[0].id, "its id is the lower one: an id cursor would have skipped it");
    let (third, _) = read_log(s, batch, cursor, 100).await;
    assert!(third.is_empty(), "nothing twice");
}

/// The snapshot's counts and the log from its cursor add up to the batch
/// as it is later, and the log pages through a large read without loss.
async fn snapshot_counts_plus_the_log_equal_the_batch_later(backend: &dyn Backend) {
    let store = backend.store();
    let s: &dyn Store = &*store;
    let batch = submit(s, 30).await;
    let w = named_worker(s, "w", 30).await;
    let (snapshot, cursor) = s.batch_with_cursor(batch).await.unwrap();
    assert_eq!(snapshot.counts.queued, 30);
    let out = s.dispatch_jobs("sd3", flowfarm_core::TextEncoderSet::All, 20, "t").await.unwrap();
    for j in &out[..10] {
        s.start_job(j.id, w, Duration::from_secs(30)).await.unwrap();
    }
    for j in &out[..5] {
        s.complete_job(j.id, 1, w, &result("r.png"), 0.1).await.unwrap();
    }
    s.cancel_jobs(&JobSelector::Batch(batch), "t", "").await.unwrap();
    let (events, _) = read_log(s, batch, cursor, 7).await;
    let mut counts: JobCounts = snapshot.counts;
    for e in &events {
        counts.apply(e.from_state, e.to_state);
    }
    assert_eq!(counts, s.get_batch(batch).await.unwrap().counts);
    assert_eq!(events.len(), 20 + 10 + 5 + 25, "every change once");
    let ids: HashSet<i64> = events.iter().map(|e| e.id).collect();
    assert_eq!(ids.len(), events.len());
}

async fn worker_with_sets(store: &dyn Store, name: &str, sets: Vec<TextEncoderSet>) -> Uuid {
    registered(store, name, 1, sets).await
}

/// A lane's head is its best job that may go out now: queued, not held
/// back; lanes with none are not listed.
async fn lane_heads_are_the_best_job_that_may_go_out(backend: &dyn Backend) {
    let store = backend.store_with_backoff(RetryBackoff { base: Duration::from_secs(60), max: Duration::from_secs(60) });
    let s: &dyn Store = &*store;
    assert!(s.lane_heads("sd3").await.unwrap().is_empty());
    let clip = |i: usize, priority: i32| ResolvedJob { text_encoders: TextEncoderSet::ClipOnly, priority, ..job(i) };
    let t5 = |i: usize, priority: i32| ResolvedJob { priority, ..job(i) };
    s.submit_batch(&batch(None, 1), &[t5(0, 5), t5(1, -3), clip(2, 40), clip(3, 7)]).await.unwrap();
    let mut heads = s.lane_heads("sd3").await.unwrap();
    heads.sort_by_key(|h| h.0.as_str());
    assert_eq!(heads, vec![(TextEncoderSet::All, 5), (TextEncoderSet::ClipOnly, 40)]);
    // The best CLIP-only job out, then back with a retry hold: the next one leads.
    let w = worker_with_sets(s, "w", vec![TextEncoderSet::All, TextEncoderSet::ClipOnly]).await;
    let out = s.dispatch_jobs("sd3", TextEncoderSet::ClipOnly, 1, "t").await.unwrap().remove(0);
    assert_eq!(out.spec.priority, 40);
    assert!(s.lane_heads("sd3").await.unwrap().contains(&(TextEncoderSet::ClipOnly, 7)));
    s.start_job(out.id, w, Duration::from_secs(30)).await.unwrap();
    s.fail_job(out.id, 1, w, "device lost", FailureCause::Transient, 0.0).await.unwrap();
    let held = s.lane_heads("sd3").await.unwrap();
    assert!(held.contains(&(TextEncoderSet::ClipOnly, 7)), "held back by its retry: {held:?}");
    backend.lift_retry_holds().await;
    assert!(s.lane_heads("sd3").await.unwrap().contains(&(TextEncoderSet::ClipOnly, 40)));
    assert!(s.lane_heads("other").await.unwrap().is_empty());
}

/// Jobs go only to workers that have the encoders they need: a worker
/// without T5 opens no window for T5 jobs, cannot start one (the job goes
/// back to the queue), and the jobs show as waiting for a worker.
async fn claims_respect_the_workers_text_encoders(backend: &dyn Backend) {
    let store = backend.store();
    let s: &dyn Store = &*store;
    let clip_job = ResolvedJob { text_encoders: TextEncoderSet::ClipOnly, ..job(100) };
    s.submit_batch(&batch(None, 1), &[job(0), job(1), clip_job]).await.unwrap();
    let clip = worker_with_sets(s, "clip", vec![TextEncoderSet::ClipOnly]).await;
    assert_eq!(s.dispatch_window("sd3", TextEncoderSet::All, 2).await.unwrap(), 0, "no worker with T5");
    assert_eq!(s.dispatch_window("sd3", TextEncoderSet::ClipOnly, 2).await.unwrap(), 1 + 2);
    let needs = [("sd3".to_owned(), TextEncoderSet::All), ("sd3".to_owned(), TextEncoderSet::ClipOnly)];
    assert_eq!(s.unserved(&needs).await.unwrap(), vec![("sd3".to_owned(), TextEncoderSet::All)], "no worker with T5");
    let stats = s.queue_stats(Some("sd3")).await.unwrap();
    assert_eq!(stats[0].waiting_for_worker, vec![(TextEncoderSet::All, 2)], "two T5 jobs wait for a worker with T5");

    let clip_out = s.dispatch_jobs("sd3", TextEncoderSet::ClipOnly, 10, "t").await.unwrap();
    assert_eq!(clip_out.len(), 1, "only the CLIP-only job is in the CLIP-only lane");
    s.start_job(clip_out[0].id, clip, Duration::from_secs(30)).await.unwrap();

    // A T5 job in front of a worker without T5 (a stale message, say) is not started by it.
    let t5 = s.dispatch_jobs("sd3", TextEncoderSet::All, 1, "t").await.unwrap().remove(0);
    assert!(matches!(s.start_job(t5.id, clip, Duration::from_secs(30)).await, Err(StoreError::Declined { .. })));
    let back = s.get_job(t5.id).await.unwrap();
    assert_eq!((back.state, back.attempt), (JobState::Queued, 1), "back in the queue, no attempt used");

    let full = worker_with_sets(s, "full", vec![TextEncoderSet::All, TextEncoderSet::ClipOnly]).await;
    assert!(s.queue_stats(Some("sd3")).await.unwrap()[0].waiting_for_worker.is_empty());
    assert_eq!(s.dispatch_window("sd3", TextEncoderSet::All, 2).await.unwrap(), 1 + 2);
    backend.lift_retry_holds().await;
    let t5 = s.dispatch_jobs("sd3", TextEncoderSet::All, 1, "t").await.unwrap().remove(0);
    s.start_job(t5.id, full, Duration::from_secs(30)).await.unwrap();
}

/// Failures by cause: bad input fails for good; a worker that cannot serve
/// a job hands it to another without using up an attempt, and counts one
/// when no other worker could take it.
async fn failures_are_handled_by_cause(backend: &dyn Backend) {
    let store = backend.store();
    let s: &dyn Store = &*store;
    s.submit_batch(&batch(None, 2), &[job(0), job(1)]).await.unwrap();
    let a = worker_with_sets(s, "a", vec![TextEncoderSet::All, TextEncoderSet::ClipOnly]).await;
    let jobs = s.dispatch_jobs("sd3", TextEncoderSet::All, 2, "t").await.unwrap();
    for j in &jobs {
        s.start_job(j.id, a, Duration::from_secs(30)).await.unwrap();
    }
    assert_eq!(
        s.fail_job(jobs[0].id, 1, a, "1000×1000 is not a multiple of 64", FailureCause::BadInput, 0.0).await.unwrap(),
        JobState::Failed
    );

    // Alone, a worker that cannot serve the job uses up an attempt (max 2 here).
    assert_eq!(s.fail_job(jobs[1].id, 1, a, "no T5 loaded", FailureCause::WorkerCannot, 0.0).await.unwrap(), JobState::Queued);
    let j = s.get_job(jobs[1].id).await.unwrap();
    assert_eq!((j.attempt, j.spec.max_attempts), (2, 2), "counted: nobody else could take it");

    // With another worker able to, it does not.
    let b = worker_with_sets(s, "b", vec![TextEncoderSet::All, TextEncoderSet::ClipOnly]).await;
    backend.lift_retry_holds().await;
    let j = s.dispatch_jobs("sd3", TextEncoderSet::All, 1, "t").await.unwrap().remove(0);
    // a failed it before and b can take it: a is declined; b starts it.
    assert!(matches!(s.start_job(j.id, a, Duration::from_secs(30)).await, Err(StoreError::Declined { .. })));
    backend.lift_retry_holds().await;
    let j = s.dispatch_jobs("sd3", TextEncoderSet::All, 1, "t").await.unwrap().remove(0);
    s.start_job(j.id, b, Duration::from_secs(30)).await.unwrap();
    worker_with_sets(s, "c", vec![TextEncoderSet::All, TextEncoderSet::ClipOnly]).await;
    assert_eq!(
        s.fail_job(j.id, 2, b, "shutting down", FailureCause::WorkerCannot, 0.0).await.unwrap(),
        JobState::Queued,
        "on its last attempt, yet not dead"
    );
    let j = s.get_job(j.id).await.unwrap();
    assert_eq!((j.attempt, j.spec.max_attempts), (3, 3), "the attempt fences b out but is not counted");
}

/// GPU-seconds are counted once, per attempt, when it ends: on its event, in
/// the job's total, the worker's, the batch's and the submitter's; heartbeats
/// add nothing.
async fn gpu_seconds_are_counted_once_per_attempt(backend: &dyn Backend) {
    let store = backend.store();
    let s: &dyn Store = &*store;
    let batch_id = submit(s, 1).await;
    let other = NewBatch { submitter: "other".into(), ..batch(None, 9) };
    s.submit_batch(&other, &[job(7)]).await.unwrap();
    let w = worker_with_sets(s, "w", vec![TextEncoderSet::All]).await;
    let lease = Duration::from_secs(30);

    let j = s.dispatch_jobs("sd3", TextEncoderSet::All, 1, "t").await.unwrap().remove(0);
    s.start_job(j.id, w, lease).await.unwrap();
    s.heartbeat(w, &[(j.id, 1)], lease, lease).await.unwrap();
    assert_eq!(s.fail_job(j.id, 1, w, "out of memory", FailureCause::Transient, 0.5).await.unwrap(), JobState::Queued);
    backend.lift_retry_holds().await;
    let j = s.dispatch_jobs("sd3", TextEncoderSet::All, 1, "t").await.unwrap().remove(0);
    s.start_job(j.id, w, lease).await.unwrap();
    s.heartbeat(w, &[(j.id, 2)], lease, lease).await.unwrap();
    let done = Completion { job_id: j.id, attempt: 2, worker_id: w, result: result("a.png"), gpu_seconds: 2.0 };
    assert_eq!(s.complete_jobs(std::slice::from_ref(&done)).await.unwrap(), vec![true]);
    s.complete_job(j.id, 2, w, &done.result, 2.0).await.expect("a repeat is a no-op");

    let attempts: Vec<(JobState, Option<f64>)> =
        s.job_events(j.id).await.unwrap().into_iter().filter(|e| e.gpu_seconds.is_some()).map(|e| (e.to_state, e.gpu_seconds)).collect();
    let ended = vec![(JobState::Queued, Some(0.5)), (JobState::Succeeded, Some(2.0))];
    assert_eq!(attempts, ended, "each attempt's time on the event that ended it");
    assert_eq!(s.get_job(j.id).await.unwrap().gpu_seconds, 2.5);
    assert_eq!(s.get_batch(batch_id).await.unwrap().gpu_seconds, 2.5);
    assert_eq!(s.get_worker(w).await.unwrap().gpu_seconds, 2.5, "heartbeats and the repeated completion add nothing");
    assert_eq!(s.gpu_seconds_by_submitter().await.unwrap(), vec![("tester".to_owned(), 2.5)], "a submitter with none is left out");
}

/// A worker that failed a job before may take it again when no other worker
/// can serve it, counting the encoders: a worker of the same model without
/// T5 is no alternative for a T5 job (it stayed dispatched forever before).
async fn a_failed_worker_retakes_a_job_only_it_can_serve(backend: &dyn Backend) {
    let store = backend.store();
    let s: &dyn Store = &*store;
    submit(s, 1).await;
    let t5 = worker_with_sets(s, "t5", vec![TextEncoderSet::All, TextEncoderSet::ClipOnly]).await;
    worker_with_sets(s, "clip", vec![TextEncoderSet::ClipOnly]).await;
    let lease = Duration::from_secs(30);
    let j = s.dispatch_jobs("sd3", TextEncoderSet::All, 1, "t").await.unwrap().remove(0);
    s.start_job(j.id, t5, lease).await.unwrap();
    assert_eq!(s.fail_job(j.id, 1, t5, "device lost", FailureCause::Transient, 0.0).await.unwrap(), JobState::Queued);
    backend.lift_retry_holds().await;
    let j = s.dispatch_jobs("sd3", TextEncoderSet::All, 1, "t").await.unwrap().remove(0);
    assert_eq!(s.start_job(j.id, t5, lease).await.unwrap().attempt, 2, "the only worker with T5 takes it again");
}

/// Ownership: a submitter's batches and jobs are its own; another's, like a
/// missing one, is NotFound, naming the first one in the request's order.
async fn ownership_names_the_first_job_that_is_not_the_submitters(backend: &dyn Backend) {
    let store = backend.store();
    let s: &dyn Store = &*store;
    let mine = submit(s, 2).await;
    let mut other = batch(None, 9);
    other.submitter = "someone-else".into();
    let theirs = s.submit_batch(&other, &[job(0)]).await.unwrap().batch.id;
    let ids = |batch: Uuid| async move {
        s.list_jobs(&JobFilter { batch_id: Some(batch), ..Default::default() }, None, 10)
            .await
            .unwrap()
            .into_iter()
            .map(|j| j.id)
            .collect::<Vec<_>>()
    };
    let (my_jobs, their_job) = (ids(mine).await, ids(theirs).await[0]);
    s.check_owned(&JobSelector::Batch(mine), "tester").await.unwrap();
    s.check_owned(&JobSelector::Ids(my_jobs.clone()), "tester").await.unwrap();
    let missing = Uuid::now_v7();
    let named = |result: Result<(), StoreError>| match result {
        Err(StoreError::NotFound { what, id }) => (what, id),
        other => panic!("{other:?}"),
    };
    assert_eq!(named(s.check_owned(&JobSelector::Batch(theirs), "tester").await), ("batch", theirs));
    assert_eq!(named(s.check_owned(&JobSelector::Ids(vec![my_jobs[0], their_job, missing]), "tester").await), ("job", their_job));
    assert_eq!(named(s.check_owned(&JobSelector::Ids(vec![missing, their_job]), "tester").await), ("job", missing));
    assert_eq!(s.batch_submitter(theirs).await.unwrap(), "someone-else");
    assert_eq!(s.job_submitter(their_job).await.unwrap(), "someone-else");
    assert!(matches!(s.job_submitter(missing).await, Err(StoreError::NotFound { what: "job", .. })));
}

/// A worker's devices, as its heartbeats report them, replace what it
/// registered with; an unknown worker is NotFound.
async fn heartbeats_report_each_device(backend: &dyn Backend) {
    let store = backend.store();
    let s: &dyn Store = &*store;
    let w = worker(s).await;
    let devices = serde_json::json!([
        {"name": "cpu:0", "memory_bytes": 1024, "busy_slots": 1, "images_done": 7, "busy_seconds": 2.5},
        {"name": "cpu:1", "memory_bytes": 1024, "busy_slots": 0, "images_done": 5, "busy_seconds": 1.5},
    ]);
    s.set_worker_devices(w, &devices).await.unwrap();
    assert_eq!(s.get_worker(w).await.unwrap().devices, devices);
    let missing = Uuid::now_v7();
    assert!(matches!(s.set_worker_devices(missing, &devices).await, Err(StoreError::NotFound { what: "worker", .. })));
}

/// Each test of the suite, once per store.
macro_rules! conformance {
    ($($test:ident),* $(,)?) => {
        mod postgres {
            $(#[tokio::test]
            async fn $test() {
                super::$test(&super::Postgres::new().await).await
            })*
        }
        mod sqlite {
            $(#[tokio::test]
            async fn $test() {
                super::$test(&super::Sqlite::new().await).await
            })*
        }
    };
}

conformance!(
    submit_stores_jobs_with_one_creation_event_each,
    recent_batches_come_newest_first_with_the_counts_get_batch_gives,
    idempotency_key_replays_or_conflicts,
    concurrent_replays_make_one_batch,
    a_job_runs_start_progress_complete_and_completion_takes_effect_once,
    expired_lease_requeues_with_next_attempt_and_fences_the_old_one,
    retryable_failures_requeue_until_the_last_attempt_then_dead,
    concurrent_dispatchers_never_take_the_same_job,
    dispatch_follows_priority_and_pauses,
    cancel_and_purge_touch_only_what_they_may,
    purged_batches_are_listed_for_the_result_sweeper,
    heartbeats_renew_leases_and_name_revoked_jobs,
    tokens_authenticate_until_revoked,
    the_dispatch_window_follows_the_fleet,
    retries_back_off_and_go_to_another_worker,
    unstarted_dispatches_are_dispatched_again,
    grouped_starts_and_completions_match_the_single_calls,
    grouped_completions_answer_each_fence_on_its_own,
    heartbeats_renew_only_the_jobs_they_list,
    a_drain_racing_a_deregistration_cannot_bring_a_worker_back,
    an_outage_is_not_held_against_leases_or_workers,
    snapshot_counts_plus_the_log_equal_the_batch_later,
    claims_respect_the_workers_text_encoders,
    lane_heads_are_the_best_job_that_may_go_out,
    failures_are_handled_by_cause,
    gpu_seconds_are_counted_once_per_attempt,
    a_failed_worker_retakes_a_job_only_it_can_serve,
    ownership_names_the_first_job_that_is_not_the_submitters,
    heartbeats_report_each_device,
);
