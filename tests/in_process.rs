//! A whole farm in one process, as an embedded farm runs it: a coordinator
//! over a real Postgres, its dispatcher publishing into the in-process queue,
//! and two workers rendering the bundled model that read from that queue
//! through `WorkSource::Given`. No Redis anywhere: the batch renders, each
//! job once. Stopping goes in order: the workers' token first (they drain
//! and deregister, which needs the coordinator), then the coordinator's.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use flowfarm_proto::v1 as pb;
use flowfarm_queue::{JobSource, MemoryQueue};
use flowfarm_testkit::TestDb;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_farm_in_one_process_renders_through_the_in_process_queue() {
    let db = TestDb::new().await;
    let dir = tempfile::tempdir().unwrap();
    let results = dir.path().join("results");
    let config_file = write(dir.path(), "flowfarm.toml", &format!("{}\n[results]\ndir = {:?}\n", coordinator_config(), results));
    let mut config = flowfarm_coordinator::Config::load(&config_file).unwrap();
    config.queue.in_process = true;
    let coordinator = flowfarm_coordinator::Coordinator::new(&config, db.store.clone()).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());

    let (stop_coordinator, stop_workers, tasks) = (CancellationToken::new(), CancellationToken::new(), TaskTracker::new());
    let queue = MemoryQueue::new();
    tasks.spawn(flowfarm_coordinator::Dispatcher::new(coordinator.clone(), Arc::new(queue.clone())).run(stop_coordinator.clone()));
    let serving = stop_coordinator.clone();
    let server = tasks.spawn(async move { flowfarm_coordinator::serve(coordinator, listener, serving).await });

    let token = |role: flowfarm_core::Role, name: &'static str| {
        let store = db.store.clone();
        async move { store.create_token(&flowfarm_store::NewToken::new(name, role), rand::random()).await.unwrap().1 }
    };
    let worker_token = token(flowfarm_core::Role::Worker, "fleet").await;
    let token_file = write(dir.path(), "worker.token", &worker_token);
    let model = repo_path("models/flowfarm-tiny");
    let mut workers = Vec::new();
    for name in ["w1", "w2"] {
        let file = write(
            dir.path(),
            &format!("{name}.toml"),
            &format!(
                "name = {name:?}\ncoordinator = {url:?}\ntoken_file = {token_file:?}\nresults_dir = {results:?}\ncapacity = 1\n\
                 drain_timeout_seconds = 30\n[[models]]\nname = \"flowfarm-tiny\"\npath = {model:?}\n"
            ),
        );
        let worker_config = flowfarm_worker::WorkerConfig::load(&file).unwrap();
        let queue = queue.clone();
        let source = flowfarm_worker::WorkSource::Given(Box::new(move |_, lanes| Arc::new(queue.consumer(lanes)) as Arc<dyn JobSource>));
        workers.push(tasks.spawn(flowfarm_worker::run_with(worker_config, source, stop_workers.clone())));
    }

    let submitter = token(flowfarm_core::Role::Submit, "alice").await;
    let channel = tonic::transport::Channel::from_shared(url.clone()).unwrap().connect().await.unwrap();
    let mut render =
        pb::render_service_client::RenderServiceClient::with_interceptor(channel, flowfarm_testkit::Auth::new(&submitter).unwrap());
    let spec = |seed: u64| pb::JobSpec {
        model: "flowfarm-tiny".into(),
        prompt: format!("a lighthouse, take {seed}"),
        seed: Some(seed),
        steps: 2,
        width: 64,
        height: 64,
        ..Default::default()
    };
    let batch = render
        .submit_batch(pb::SubmitBatchRequest { jobs: (0..8).map(spec).collect(), ..Default::default() })
        .await
        .unwrap()
        .into_inner()
        .batch
        .unwrap();

    let deadline = Instant::now() + Duration::from_secs(300);
    let counts = loop {
        let counts = render.get_batch(pb::GetBatchRequest { batch_id: batch.id.clone() }).await.unwrap().into_inner().counts.unwrap();
        if counts.succeeded + counts.failed + counts.cancelled + counts.dead == 8 || Instant::now() > deadline {
            break counts;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(counts.succeeded, 8, "every job rendered: {counts:?}");
    let started: i64 =
        sqlx::query_scalar("SELECT count(*) FROM job_events WHERE to_state = 'running'").fetch_one(db.store.pool()).await.unwrap();
    assert_eq!(started, 8, "each job started once");
    let by_worker: Vec<(String, i64)> =
        sqlx::query_as("SELECT name, images_done FROM workers ORDER BY name").fetch_all(db.store.pool()).await.unwrap();
    assert_eq!(by_worker.iter().map(|(_, n)| n).sum::<i64>(), 8, "{by_worker:?}");
    assert_eq!(walk(&results).len(), 8, "one image per job");

    // The workers stop first: they drain and deregister with the coordinator.
    stop_workers.cancel();
    for worker in workers {
        tokio::time::timeout(Duration::from_secs(60), worker).await.expect("a worker drains in time").unwrap().expect("and exits cleanly");
    }
    let states: Vec<String> = sqlx::query_scalar("SELECT state FROM workers").fetch_all(db.store.pool()).await.unwrap();
    assert_eq!(states, vec!["gone", "gone"], "both workers deregistered");
    // Then the coordinator, and with it every task of the farm.
    stop_coordinator.cancel();
    tasks.close();
    tokio::time::timeout(Duration::from_secs(60), tasks.wait()).await.expect("everything ends after the shutdown");
    server.await.unwrap().expect("the server stops cleanly");
}
