//! The result sweeper removes objects no success recorded, of jobs that
//! have ended or no longer exist, once past the grace period; it keeps the
//! recorded results and anything a running job may still report.

use std::time::Duration;

use flowfarm_coordinator::sweeper::sweep_orphans;
use flowfarm_core::TextEncoderSet;
use flowfarm_proto::v1 as pb;
use flowfarm_results::ResultStore;
use flowfarm_store::{FailureCause, JobResultRow};
use flowfarm_testkit::Harness;

/// A worker serving `sd3` with `capacity` slots.
async fn register(h: &Harness, capacity: u32) -> uuid::Uuid {
    let request = pb::RegisterWorkerRequest { name: "w".into(), models: vec!["sd3".into()], capacity, ..Default::default() };
    h.worker().register_worker(request).await.unwrap().into_inner().worker_id.parse().unwrap()
}

#[tokio::test]
async fn orphaned_result_objects_are_removed_and_nothing_else() {
    let h = Harness::start().await;
    let mut r = h.render();
    let spec = |p: &str| pb::JobSpec { model: "sd3".into(), prompt: p.into(), ..Default::default() };
    let batch = r
        .submit_batch(pb::SubmitBatchRequest { jobs: vec![spec("a"), spec("b"), spec("c")], ..Default::default() })
        .await
        .unwrap()
        .into_inner()
        .batch
        .unwrap()
        .id;
    let worker = register(&h, 3).await;
    let store = &h.db.store;
    let mut jobs = store.dispatch_jobs("sd3", TextEncoderSet::All, 3, "t").await.unwrap();
    jobs.sort_by_key(|j| j.index);
    for j in &jobs {
        store.start_job(j.id, worker, Duration::from_secs(60)).await.unwrap();
    }
    let (done, failed, running) = (jobs[0].id, jobs[1].id, jobs[2].id);
    let results = ResultStore::local(h.results_dir.path()).unwrap();
    let put = |job: uuid::Uuid, name: &str| {
        let key = format!("{batch}/{job}/{name}");
        let results = &results;
        async move { results.put(&key, b"png bytes".to_vec()).await.unwrap().key }
    };
    let recorded = put(done, "a1-w.png").await;
    let result = JobResultRow {
        key: recorded.clone(),
        sha256: "0".repeat(64),
        size_bytes: 9,
        content_type: "image/png".into(),
        model_hash: String::new(),
    };
    store.complete_job(done, 1, worker, &result, 1.0).await.unwrap();
    store.fail_job(failed, 1, worker, "bad size", FailureCause::BadInput, 0.5).await.unwrap();
    let stale = put(done, "a0-lost-worker.png").await;
    let of_failed = put(failed, "a1-w.png").await;
    let in_flight = put(running, "a1-w.png").await;
    let of_purged = put(uuid::Uuid::now_v7(), "a1-w.png").await;

    let within = Duration::from_secs(3600);
    assert_eq!(sweep_orphans(store, &results, within, Duration::from_secs(3600)).await.unwrap(), 0, "nothing past the grace yet");
    assert_eq!(sweep_orphans(store, &results, within, Duration::ZERO).await.unwrap(), 3);
    let mut left: Vec<String> = results.list(&batch).await.unwrap().into_iter().map(|(k, _)| k).collect();
    left.sort();
    let mut kept = vec![recorded, in_flight];
    kept.sort();
    assert_eq!(left, kept, "removed: {stale}, {of_failed}, {of_purged}");
    h.stop().await;
}

/// A purge removes jobs that ended long ago, often a whole batch: their
/// objects go at the next sweep, although no job of the batch ended lately
/// (they stayed in the bucket for good before).
#[tokio::test]
async fn objects_of_purged_jobs_are_removed_even_when_their_batch_is_old_or_gone() {
    let h = Harness::start().await;
    let spec = |p: &str| pb::JobSpec { model: "sd3".into(), prompt: p.into(), ..Default::default() };
    let submit = |n: usize| {
        let mut r = h.render();
        async move {
            let jobs = (0..n).map(|i| spec(&format!("p{i}"))).collect();
            r.submit_batch(pb::SubmitBatchRequest { jobs, ..Default::default() }).await.unwrap().into_inner().batch.unwrap().id
        }
    };
    let (whole, partly) = (submit(2).await, submit(2).await);
    let worker = register(&h, 4).await;
    let store = &h.db.store;
    let results = ResultStore::local(h.results_dir.path()).unwrap();
    let jobs = store.dispatch_jobs("sd3", TextEncoderSet::All, 4, "t").await.unwrap();
    for j in &jobs {
        store.start_job(j.id, worker, Duration::from_secs(60)).await.unwrap();
        let key = results.put(&format!("{}/{}/a1-w.png", j.batch_id, j.id), b"png bytes".to_vec()).await.unwrap().key;
        let result =
            JobResultRow { key, sha256: "0".repeat(64), size_bytes: 9, content_type: "image/png".into(), model_hash: String::new() };
        store.complete_job(j.id, 1, worker, &result, 1.0).await.unwrap();
    }
    // Both batches ended two days ago; one is purged whole, the other one job.
    sqlx::query("UPDATE jobs SET updated_at = now() - interval '2 days'").execute(store.pool()).await.unwrap();
    assert_eq!(store.purge_jobs(Some(&flowfarm_store::JobSelector::Batch(whole.parse().unwrap())), None).await.unwrap(), 2);
    let one = jobs.iter().find(|j| j.batch_id.to_string() == partly).unwrap();
    assert_eq!(store.purge_jobs(Some(&flowfarm_store::JobSelector::Ids(vec![one.id])), None).await.unwrap(), 1);

    let within = Duration::from_secs(3600);
    assert_eq!(sweep_orphans(store, &results, within, Duration::ZERO).await.unwrap(), 3, "every purged job's object");
    assert!(results.list(&whole).await.unwrap().is_empty(), "the purged batch's objects are gone");
    let left: Vec<String> = results.list(&partly).await.unwrap().into_iter().map(|(k, _)| k).collect();
    assert_eq!(left.len(), 1, "the job that stays keeps its image: {left:?}");
    assert!(!left[0].contains(&one.id.to_string()), "{left:?}");
    h.stop().await;
}
