//! The dispatcher over each queue it can dispatch into (Redis Streams at
//! FLOWFARM_TEST_REDIS_URL, and the in-process queue): submitted jobs reach
//! a reader of their lane once each, as many as the fleet has room for, and
//! a job a worker started is not dispatched again.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use flowfarm_proto::v1 as pb;
use flowfarm_queue::{stream_key, Consumer, Delivery, JobQueue, JobSource, MemoryQueue, WorkQueue};
use flowfarm_testkit::Harness;
use redis::AsyncCommands;

fn redis_url() -> String {
    std::env::var("FLOWFARM_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/0".into())
}

enum Kind {
    Redis,
    Memory,
}

/// Reads until `n` deliveries came or 20 s passed.
async fn read_n(reader: &dyn JobSource, n: usize) -> Vec<Delivery> {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut got = Vec::new();
    while got.len() < n && Instant::now() < deadline {
        got.extend(reader.read(n - got.len(), Duration::from_millis(200)).await.unwrap());
    }
    got
}

async fn submitted_jobs_reach_a_reader_of_their_lane(kind: Kind) {
    // A model of its own: its lane is this test's alone, in a shared Redis too.
    let model = format!("dispatch-{}", uuid::Uuid::new_v4());
    let (queue, memory): (Arc<dyn JobQueue>, Option<MemoryQueue>) = match kind {
        Kind::Redis => (Arc::new(WorkQueue::connect(&redis_url()).await.unwrap()), None),
        Kind::Memory => {
            let memory = MemoryQueue::new();
            (Arc::new(memory.clone()), Some(memory))
        }
    };
    let renamed = model.clone();
    let h = Harness::start_dispatching_into(queue.clone(), move |c| {
        c.models[0].name = renamed;
        c.queue.lookahead_per_worker = 0;
    })
    .await;
    let mut worker = h.worker();
    let worker_id = worker
        .register_worker(pb::RegisterWorkerRequest { name: "w".into(), models: vec![model.clone()], capacity: 3, ..Default::default() })
        .await
        .unwrap()
        .into_inner()
        .worker_id;
    let lanes = vec![flowfarm_queue::lane(&model, true)];
    let reader: Arc<dyn JobSource> = match &memory {
        Some(memory) => Arc::new(memory.consumer(&lanes)),
        None => Arc::new(Consumer::connect(&redis_url(), &worker_id, &lanes).await.unwrap()),
    };
    let spec = pb::JobSpec { model: model.clone(), prompt: "a lighthouse".into(), ..Default::default() };
    let batch = h
        .render()
        .submit_batch(pb::SubmitBatchRequest { jobs: vec![spec; 5], ..Default::default() })
        .await
        .unwrap()
        .into_inner()
        .batch
        .unwrap();

    // Room for three: three messages, each a job of the batch, each once.
    let first = read_n(reader.as_ref(), 3).await;
    assert_eq!(first.len(), 3, "the dispatcher fills the worker's free slots");
    let ids: HashSet<String> = first.iter().map(|d| d.job.as_ref().unwrap().job_id.to_string()).collect();
    assert_eq!(ids.len(), 3, "no job twice");
    assert!(reader.read(5, Duration::from_millis(300)).await.unwrap().is_empty(), "nothing beyond the free slots");
    assert_eq!(queue.depth(&lanes[0]).await.unwrap(), 3);

    // The worker starts and finishes them: the other two follow.
    let started = worker
        .start_jobs(pb::StartJobsRequest { worker_id: worker_id.clone(), job_ids: ids.iter().cloned().collect() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(started.outcomes.len(), 3);
    reader.ack_many(&first).await.unwrap();
    for outcome in started.outcomes {
        let Some(pb::start_job_outcome::Outcome::Started(start)) = outcome.outcome else { panic!("not started: {outcome:?}") };
        let job = start.job.expect("the started job");
        worker
            .fail_job(pb::FailJobRequest {
                job_id: job.id.clone(),
                attempt: start.attempt,
                worker_id: worker_id.clone(),
                error: "test: give the slot back".into(),
                cause: pb::FailureCause::BadInput as i32,
                ..Default::default()
            })
            .await
            .unwrap();
    }
    let rest = read_n(reader.as_ref(), 2).await;
    let rest_ids: HashSet<String> = rest.iter().map(|d| d.job.as_ref().unwrap().job_id.to_string()).collect();
    assert_eq!(rest_ids.len(), 2);
    assert!(rest_ids.is_disjoint(&ids), "a started job is not dispatched again");
    reader.ack_many(&rest).await.unwrap();
    let counts = h.render().get_batch(pb::GetBatchRequest { batch_id: batch.id }).await.unwrap().into_inner().counts.unwrap();
    assert_eq!((counts.failed, counts.dispatched), (3, 2));

    if let Kind::Redis = kind {
        let mut conn = redis::Client::open(redis_url()).unwrap().get_multiplexed_async_connection().await.unwrap();
        let _: () = conn.del(stream_key(&lanes[0])).await.unwrap();
    }
}

#[tokio::test]
async fn redis_streams_submitted_jobs_reach_a_reader_of_their_lane() {
    submitted_jobs_reach_a_reader_of_their_lane(Kind::Redis).await;
}

#[tokio::test]
async fn in_process_submitted_jobs_reach_a_reader_of_their_lane() {
    submitted_jobs_reach_a_reader_of_their_lane(Kind::Memory).await;
}

/// Priority holds across a model's two lanes: with one free slot, a
/// high-priority CLIP-only job goes out before a backlog of T5 jobs of lower
/// priority (the T5 lane used to be filled first, whatever the priorities),
/// and the slots of the whole model are never given out twice.
#[tokio::test]
async fn priority_holds_across_the_lanes_of_a_model() {
    let queue = MemoryQueue::new();
    let h = Harness::start_dispatching_into(Arc::new(queue.clone()), |c| c.queue.lookahead_per_worker = 0).await;
    let mut worker = h.worker();
    let sets = vec![pb::TextEncoderSet::All as i32, pb::TextEncoderSet::ClipOnly as i32];
    let request = pb::RegisterWorkerRequest {
        name: "w".into(),
        models: vec!["sd3".into()],
        capacity: 1,
        text_encoder_sets: sets,
        ..Default::default()
    };
    worker.register_worker(request).await.unwrap();
    let spec = |prompt: &str, clip_only: bool, priority: i32| pb::JobSpec {
        model: "sd3".into(),
        prompt: prompt.into(),
        text_encoders: if clip_only { pb::TextEncoderSet::ClipOnly as i32 } else { pb::TextEncoderSet::All as i32 },
        priority,
        ..Default::default()
    };
    let jobs = vec![spec("t5 a", false, 0), spec("t5 b", false, 0), spec("clip urgent", true, 100)];
    let batch = h.render().submit_batch(pb::SubmitBatchRequest { jobs, ..Default::default() }).await.unwrap().into_inner().batch.unwrap();
    let listed =
        h.render().list_jobs(pb::ListJobsRequest { batch_id: batch.id.clone(), ..Default::default() }).await.unwrap().into_inner().jobs;
    let urgent = listed.iter().find(|j| j.spec.as_ref().is_some_and(|s| s.prompt == "clip urgent")).unwrap().id.clone();

    let lanes = vec![flowfarm_queue::lane("sd3", true), flowfarm_queue::lane("sd3", false)];
    let reader = queue.consumer(&lanes);
    let first = read_n(&reader, 1).await;
    assert_eq!(first.len(), 1);
    assert_eq!(first[0].job.as_ref().unwrap().job_id.to_string(), urgent, "the higher priority goes first, whatever its lane");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(reader.read(5, Duration::from_millis(100)).await.unwrap().is_empty(), "one slot, one job out: {lanes:?}");
    h.stop().await;
}
