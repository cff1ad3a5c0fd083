//! Bench (not a test): the coordinator's job lifecycle with no rendering,
//! on each kind of farm, in the same run:
//!
//! - the embedded farm (`flowfarm dev`): SQLite in a temporary file and the
//!   in-process queue;
//! - the production farm: Postgres and Redis (as the tests use them).
//!
//! An in-process coordinator with its dispatcher, and a bench client that
//! plays many workers at once: each reads up to its capacity from its
//! queue, claims what it read with one StartJobs, reports it with one
//! CompleteJobs and acknowledges it, as the worker daemon does.
//!
//! 1. Latency: idle workers; one job submitted at a time; SubmitBatch call
//!    to StartJob answered, p50 / p99.
//! 2. Throughput: 20,000 jobs (`FLOWFARM_BENCH_BATCHES` × 10,000) through
//!    64 workers × 16 slots (`FLOWFARM_BENCH_WORKERS=16x16` for others);
//!    jobs/s from the first submission to the last completion.
//!
//! `cargo bench -p flowfarm-coordinator --bench lifecycle`
//! (`FLOWFARM_BENCH_FARM=embedded` or `postgres` for one of them;
//! FLOWFARM_TEST_REDIS_URL, default redis://127.0.0.1:6379/0; uses and
//! then deletes the stream `ff:jobs:sd3`). Prints figures, and the embedded
//! farm's throughput as a ratio to the production farm's; asserts nothing
//! about time.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use flowfarm_core::Role;
use flowfarm_proto::v1 as pb;
use flowfarm_queue::{stream_key, Consumer, JobSource, MemoryQueue};
use flowfarm_store::{NewToken, SqliteStore, Store};
use flowfarm_testkit::{Auth, Harness, Render, Worker};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

const MODEL: &str = "sd3";

#[derive(Default)]
struct Tally {
    done: AtomicUsize,
    start_micros: AtomicU64,
    complete_micros: AtomicU64,
    read_micros: AtomicU64,
    reads: AtomicU64,
}

/// When each job's StartJob was answered, by job id.
type Started = Arc<Mutex<HashMap<String, Instant>>>;

/// A farm under test: its clients, a worker's queue reader, and its stop.
struct Farm {
    name: &'static str,
    render: Render,
    worker: Worker,
    /// A reader of the queue for a registered worker's id.
    source: Box<dyn Fn(String) -> futures::future::BoxFuture<'static, Arc<dyn JobSource>>>,
    stop: Box<dyn FnOnce() -> futures::future::BoxFuture<'static, ()>>,
}

fn tweak(config: &mut flowfarm_coordinator::Config) {
    config.queue.lookahead_per_worker = 32;
    config.queue.dispatch_interval_seconds = 0.05;
    config.database.max_connections = 32;
}

/// The production farm: Postgres and Redis.
async fn postgres_farm(redis: String) -> Farm {
    {
        let mut conn = redis::Client::open(redis.as_str()).unwrap().get_multiplexed_async_connection().await.expect("Redis");
        let _: () = redis::cmd("DEL").arg(stream_key(MODEL)).query_async(&mut conn).await.unwrap();
    }
    let h = Harness::start_dispatching(&redis, tweak).await;
    Farm {
        name: "Postgres + Redis",
        render: h.render(),
        worker: h.worker(),
        source: Box::new(move |id| {
            let redis = redis.clone();
            Box::pin(
                async move { Arc::new(Consumer::connect(&redis, &id, &[MODEL.to_owned()]).await.expect("consumer")) as Arc<dyn JobSource> },
            )
        }),
        stop: Box::new(move || Box::pin(h.stop())),
    }
}

/// The embedded farm of `flowfarm dev`: SQLite and the in-process queue.
async fn embedded_farm() -> Farm {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = SqliteStore::open(&dir.path().join("farm.db")).await.expect("SQLite store");
    let mut config = flowfarm_testkit::test_config();
    config.results.dir = dir.path().join("results");
    config.queue.in_process = true;
    tweak(&mut config);
    let token = |role, name| {
        let store = store.clone();
        async move { store.create_token(&NewToken::new(name, role), rand::random()).await.expect("token").1 }
    };
    let (submit, worker) = (token(Role::Submit, "sub").await, token(Role::Worker, "wrk").await);
    let coordinator = flowfarm_coordinator::Coordinator::new(&config, store).expect("coordinator");
    let queue = MemoryQueue::new();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (shutdown, tasks) = (CancellationToken::new(), TaskTracker::new());
    tasks.spawn(flowfarm_coordinator::Dispatcher::new(coordinator.clone(), Arc::new(queue.clone())).run(shutdown.clone()));
    let serving = shutdown.clone();
    tasks.spawn(async move { flowfarm_coordinator::serve(coordinator, listener, serving).await.expect("serve") });
    tasks.close();
    let channel = tonic::transport::Channel::from_shared(format!("http://{addr}")).expect("uri").connect_lazy();
    let auth = |token: &str| Auth::new(token).expect("token");
    Farm {
        name: "embedded (SQLite + in-process queue)",
        render: pb::render_service_client::RenderServiceClient::with_interceptor(channel.clone(), auth(&submit)),
        worker: pb::worker_service_client::WorkerServiceClient::with_interceptor(channel, auth(&worker)),
        source: Box::new(move |_| {
            let reader = Arc::new(queue.consumer(&[MODEL.to_owned()])) as Arc<dyn JobSource>;
            Box::pin(async move { reader })
        }),
        stop: Box::new(move || {
            Box::pin(async move {
                shutdown.cancel();
                tasks.wait().await;
                drop(dir);
            })
        }),
    }
}

async fn play_worker(farm: &Farm, name: String, capacity: u32, tally: Arc<Tally>, waiters: Started, mut stop: watch::Receiver<bool>) {
    let mut client = farm.worker.clone();
    let worker_id = client
        .register_worker(pb::RegisterWorkerRequest { name: name.clone(), models: vec![MODEL.into()], capacity, ..Default::default() })
        .await
        .expect("register")
        .into_inner()
        .worker_id;
    let consumer = (farm.source)(worker_id.clone()).await;
    tokio::spawn(async move {
        loop {
            if *stop.borrow() {
                return;
            }
            let t = Instant::now();
            let deliveries = tokio::select! {
                d = consumer.read(capacity as usize, Duration::from_millis(100)) => d.expect("read"),
                _ = stop.changed() => return,
            };
            tally.read_micros.fetch_add(t.elapsed().as_micros() as u64, Ordering::Relaxed);
            tally.reads.fetch_add(1, Ordering::Relaxed);
            if deliveries.is_empty() {
                continue;
            }
            // As the worker daemon does: one StartJobs for the read, one
            // CompleteJobs for what it started, one acknowledgement.
            let job_ids: Vec<String> = deliveries.iter().map(|d| d.job.as_ref().expect("well-formed message").job_id.to_string()).collect();
            let t = Instant::now();
            let outcomes = client
                .start_jobs(pb::StartJobsRequest { worker_id: worker_id.clone(), job_ids: job_ids.clone() })
                .await
                .expect("start")
                .into_inner()
                .outcomes;
            let started_at = Instant::now();
            tally.start_micros.fetch_add((started_at - t).as_micros() as u64 * job_ids.len() as u64, Ordering::Relaxed);
            let mut completed = Vec::new();
            for (job_id, outcome) in job_ids.into_iter().zip(outcomes) {
                if let Some(pb::start_job_outcome::Outcome::Started(started)) = outcome.outcome {
                    waiters.lock().unwrap().insert(job_id.clone(), started_at);
                    completed.push(pb::CompletedJob {
                        result: Some(pb::JobResult {
                            key: format!("bench/{job_id}.png"),
                            sha256: "0".repeat(64),
                            size_bytes: 1,
                            content_type: "image/png".into(),
                            ..Default::default()
                        }),
                        job_id,
                        attempt: started.attempt,
                        gpu_seconds: 0.0,
                    });
                }
            }
            if !completed.is_empty() {
                let n = completed.len();
                let t = Instant::now();
                let outcomes = client
                    .complete_jobs(pb::CompleteJobsRequest { worker_id: worker_id.clone(), jobs: completed })
                    .await
                    .expect("complete")
                    .into_inner()
                    .outcomes;
                assert!(outcomes.iter().all(|o| o.refused.is_none()), "a completion was refused");
                tally.complete_micros.fetch_add(t.elapsed().as_micros() as u64 * n as u64, Ordering::Relaxed);
                tally.done.fetch_add(n, Ordering::Relaxed);
            }
            consumer.ack_many(&deliveries).await.expect("ack");
        }
    });
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize].as_secs_f64() * 1e3
}

async fn wait_done(tally: &Tally, n: usize) {
    while tally.done.load(Ordering::Relaxed) < n {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::main]
async fn main() {
    let redis = std::env::var("FLOWFARM_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/0".into());
    let which = std::env::var("FLOWFARM_BENCH_FARM").unwrap_or_default();
    let mut throughputs = Vec::new();
    if which.is_empty() || which == "embedded" {
        throughputs.push(bench(embedded_farm().await).await);
    }
    if which.is_empty() || which == "postgres" {
        throughputs.push(bench(postgres_farm(redis).await).await);
    }
    if let [embedded, postgres] = throughputs[..] {
        println!("embedded / Postgres + Redis lifecycle throughput: {:.2}", embedded / postgres);
    }
}

/// Runs both phases on `farm`; returns its throughput in jobs/s.
async fn bench(farm: Farm) -> f64 {
    println!("== {} ==", farm.name);
    let tally = Arc::new(Tally::default());
    let waiters: Started = Arc::default();
    let (stop_tx, stop) = watch::channel(false);
    let mut render = farm.render.clone();

    // 1. Latency with idle workers.
    for i in 0..4 {
        play_worker(&farm, format!("idle-{i}"), 1, tally.clone(), waiters.clone(), stop.clone()).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut latencies = Vec::new();
    for i in 0..300u64 {
        let request = pb::SubmitBatchRequest {
            jobs: vec![pb::JobSpec { model: MODEL.into(), prompt: format!("latency probe {i}"), ..Default::default() }],
            ..Default::default()
        };
        let t = Instant::now();
        let batch = render.submit_batch(request).await.expect("submit").into_inner().batch.expect("batch");
        let job = render
            .list_jobs(pb::ListJobsRequest { batch_id: batch.id, ..Default::default() })
            .await
            .expect("list")
            .into_inner()
            .jobs
            .remove(0);
        let deadline = Instant::now() + Duration::from_secs(10);
        let started = loop {
            if let Some(at) = waiters.lock().unwrap().remove(&job.id) {
                break at;
            }
            assert!(Instant::now() < deadline, "job {} did not start", job.id);
            tokio::time::sleep(Duration::from_micros(200)).await;
        };
        latencies.push(started - t);
        wait_done(&tally, i as usize + 1).await;
    }
    latencies.sort();
    println!(
        "submit → start, idle workers ({} jobs, one at a time): p50 {:.2} ms   p99 {:.2} ms   max {:.2} ms",
        latencies.len(),
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99),
        percentile(&latencies, 1.0)
    );

    // 2. Throughput.
    let base = tally.done.load(Ordering::Relaxed);
    for key in [&tally.start_micros, &tally.complete_micros, &tally.read_micros, &tally.reads] {
        key.store(0, Ordering::Relaxed);
    }
    let (workers, slots) = std::env::var("FLOWFARM_BENCH_WORKERS")
        .ok()
        .and_then(|v| v.split_once('x').and_then(|(w, s)| Some((w.parse::<u32>().ok()?, s.parse::<u32>().ok()?))))
        .unwrap_or((64, 16));
    println!("throughput: {workers} workers × {slots} slots");
    for i in 0..workers {
        play_worker(&farm, format!("busy-{i}"), slots, tally.clone(), waiters.clone(), stop.clone()).await;
    }
    // Batches of 10,000 (a 100 × 100 grid each).
    let batches: usize = std::env::var("FLOWFARM_BENCH_BATCHES").ok().and_then(|v| v.parse().ok()).unwrap_or(2);
    let total = batches * 10_000;
    let t = Instant::now();
    for half in 0..batches {
        let request = pb::SubmitBatchRequest {
            grid: Some(pb::JobGrid {
                base: Some(pb::JobSpec { model: MODEL.into(), ..Default::default() }),
                prompts: (0..100).map(|i| format!("throughput {half} {i}")).collect(),
                seeds: (0..100).collect(),
                sizes: vec![],
            }),
            ..Default::default()
        };
        render.submit_batch(request).await.expect("submit");
    }
    let submitted = t.elapsed();
    wait_done(&tally, base + total).await;
    let elapsed = t.elapsed();
    let per_job = |micros: &AtomicU64| micros.load(Ordering::Relaxed) as f64 / total as f64 / 1e3;
    println!(
        "lifecycle throughput: {total} jobs in {:.2} s (submission {:.2} s of it) = {:.0} jobs/s",
        elapsed.as_secs_f64(),
        submitted.as_secs_f64(),
        total as f64 / elapsed.as_secs_f64()
    );
    println!(
        "  per job, as the workers saw it: StartJob {:.2} ms, CompleteJob {:.2} ms (latency, calls overlap); {} stream reads",
        per_job(&tally.start_micros),
        per_job(&tally.complete_micros),
        tally.reads.load(Ordering::Relaxed)
    );
    let _ = stop_tx.send(true);
    (farm.stop)().await;
    total as f64 / elapsed.as_secs_f64()
}
