//! The worker daemon's life: register, heartbeat, read the work streams,
//! claim, render, store, report, acknowledge; cordon and drain on request.
//!
//! Nothing here is the truth about a job: the coordinator is. A refused
//! report (FAILED_PRECONDITION: cancelled, requeued, lease lost) means the
//! job is no longer this worker's, and the work is dropped.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use flowfarm_engine::cache::EmbeddingCache;
use flowfarm_engine::device::{device_info, device_name, open_device, parse_dtype};
use flowfarm_engine::EngineError;
use flowfarm_group::Grouper;
use flowfarm_proto::client::{endpoint, BearerToken};
use flowfarm_proto::v1 as pb;
use flowfarm_proto::v1::worker_service_client::WorkerServiceClient;
use flowfarm_queue::{Consumer, Delivery};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Code, Status};
use tracing::Instrument;
use uuid::Uuid;

use crate::config::{hostname, WorkerConfig};
use crate::metrics::WorkerMetrics;
use crate::render::{resolved_job, JobRenderer};
use crate::WorkerError;
use flowfarm_results::ResultStore;

/// Longest wait on the streams before the loop looks at its state again.
const READ_BLOCK: Duration = Duration::from_millis(500);
/// How long a report is retried while the coordinator is away.
const REPORT_PATIENCE: Duration = Duration::from_secs(300);

type Client = WorkerServiceClient<InterceptedService<Channel, BearerToken>>;

/// What the worker is doing, as the operators (or a signal) asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Active,
    Cordoned,
    Draining,
}

/// A job being rendered here.
struct RunningJob {
    attempt: u32,
    /// Set when the job is no longer ours (revoked, refused report).
    revoked: Arc<AtomicBool>,
    /// Set when the drain deadline passed: hand the job back.
    handed_back: Arc<AtomicBool>,
}

struct Shared {
    client: Client,
    worker_id: String,
    running: Mutex<HashMap<Uuid, RunningJob>>,
    mode: watch::Sender<Mode>,
    renderers: HashMap<String, Arc<JobRenderer>>,
    results: ResultStore,
    consumer: Consumer,
    metrics: WorkerMetrics,
    /// Completions that finish while a report is in flight go in the next
    /// CompleteJobs together.
    completions: Grouper<pb::CompletedJob, Result<(), Status>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Whether a failed call may succeed if tried again (coordinator restarting,
/// network hiccup) rather than being an answer.
fn transient(status: &Status) -> bool {
    transient_code(status.code())
}

fn transient_code(code: Code) -> bool {
    matches!(code, Code::Unavailable | Code::Unknown | Code::DeadlineExceeded | Code::Internal | Code::Cancelled)
}

/// Calls `call` until it answers something other than a transient error,
/// backing off from 100 ms to 5 s, for at most `patience`.
async fn retrying<T, F, Fut>(what: &str, patience: Duration, mut call: F) -> Result<T, Status>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, Status>>,
{
    let started = Instant::now();
    let mut pause = Duration::from_millis(100);
    let mut warned = false;
    loop {
        match call().await {
            Err(status) if transient(&status) && started.elapsed() < patience => {
                if !warned {
                    tracing::warn!(%what, error = %status.message(), "coordinator unreachable; retrying");
                    warned = true;
                }
                tokio::time::sleep(jitter(pause)).await;
                pause = (pause * 2).min(Duration::from_secs(5));
            }
            other => return other,
        }
    }
}

fn jitter(d: Duration) -> Duration {
    d.mul_f64(0.5 + rand::random::<f64>() * 0.5)
}

/// Runs a worker until it has drained: after `shutdown` resolves (SIGTERM)
/// or an operator drains it, it takes no more work, lets running jobs
/// finish for `drain_timeout_seconds`, hands back what is left, deregisters
/// and returns.
///
/// # Errors
/// [`WorkerError`] if a model cannot be loaded, the token is refused, or
/// registration fails for good.
pub async fn run(config: WorkerConfig, shutdown: impl Future<Output = ()> + Send + 'static) -> Result<(), WorkerError> {
    let cache = Arc::new(EmbeddingCache::new(config.embedding_cache_bytes));
    // Served from the start, so a liveness probe answers while large models load.
    let metrics = WorkerMetrics::new(cache.clone());
    if let Some(addr) = config.metrics_listen {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| WorkerError::Config(format!("cannot serve metrics on {addr} (metrics_listen): {e}")))?;
        println!("metrics on {}", listener.local_addr().map_err(|e| WorkerError::Internal(e.to_string()))?);
        tokio::spawn(crate::metrics::serve(metrics.clone(), listener));
    }
    let device = open_device(&config.device).map_err(|e| WorkerError::Config(e.to_string()))?;
    let dtype = parse_dtype(&config.dtype).map_err(|e| WorkerError::Config(e.to_string()))?;
    let (device_label, device_memory) = device_info(&device);
    let device_memory = device_memory.unwrap_or_else(|| if device.is_cpu() { total_memory_bytes() } else { 0 });
    metrics.set_device(&device_label, device_memory);
    let mut renderers = HashMap::new();
    for entry in &config.models {
        let (source, t5, cache) = (entry.source(), config.t5_max_length, cache.clone());
        let on = device.clone();
        let renderer = tokio::task::spawn_blocking(move || JobRenderer::open(&source, t5, cache, &on, dtype))
            .await
            .map_err(|e| WorkerError::Internal(e.to_string()))?
            .map_err(|source| WorkerError::Model { name: entry.name.clone(), source })?;
        tracing::info!(model = %entry.name, path = %entry.path.display(), t5 = renderer.has_t5(), hash = %renderer.model_hash(), device = %device_name(&device), ?dtype, "model loaded");
        renderers.insert(entry.name.clone(), Arc::new(renderer));
    }
    let results = ResultStore::open(config.results_url.as_deref(), &config.results_dir)?;
    let token = BearerToken::new(&config.token).map_err(|e| WorkerError::Config(format!("token: {e}")))?;
    let channel = endpoint(&config.coordinator, &config.client_tls())
        .map_err(|e| WorkerError::Config(format!("coordinator `{}`: {e}", config.coordinator)))?
        .connect_lazy();
    let client = WorkerServiceClient::with_interceptor(channel, token);

    let all_t5 = renderers.values().all(|r| r.has_t5());
    let mut sets = vec![pb::TextEncoderSet::ClipOnly as i32];
    if all_t5 {
        sets.insert(0, pb::TextEncoderSet::All as i32);
    }
    let name = config.worker_name();
    let register = pb::RegisterWorkerRequest {
        name: name.clone(),
        hostname: hostname(),
        devices: vec![pb::Device {
            name: device_label.clone(),
            // The host's memory on the CPU; 0 if a GPU's is not known.
            memory_bytes: device_memory,
        }],
        models: config.models.iter().map(|m| m.name.clone()).collect(),
        model_hashes: renderers.iter().map(|(name, r)| (name.clone(), r.model_hash())).collect(),
        text_encoder_sets: sets,
        capacity: config.capacity,
        version: env!("CARGO_PKG_VERSION").into(),
    };
    let registered = retrying("RegisterWorker", Duration::MAX, || {
        let mut client = client.clone();
        let request = register.clone();
        async move { client.register_worker(request).await }
    })
    .await
    .map_err(|status| WorkerError::Rpc { what: "RegisterWorker", status })?
    .into_inner();
    let worker_id = registered.worker_id;
    tracing::info!(worker = %worker_id, %name, capacity = config.capacity, "registered");

    // The lanes this worker can serve: every model's CLIP-only jobs, and its
    // T5 jobs when every model it loaded has T5 (as registered above).
    let lanes: Vec<String> = config
        .models
        .iter()
        .flat_map(|m| {
            let t5 = all_t5.then(|| flowfarm_queue::lane(&m.name, true));
            t5.into_iter().chain([flowfarm_queue::lane(&m.name, false)])
        })
        .collect();
    let consumer = connect_consumer(&config.redis_target(), &worker_id, &lanes).await;
    metrics.set_ready(true);
    let (mode, mut mode_rx) = watch::channel(Mode::Active);
    let completions = completion_reporter(client.clone(), worker_id.clone());
    let shared = Arc::new(Shared {
        client,
        worker_id,
        completions,
        running: Mutex::new(HashMap::new()),
        mode,
        renderers,
        results,
        consumer,
        metrics,
    });
    {
        let shared = shared.clone();
        tokio::spawn(async move {
            shutdown.await;
            tracing::info!("shutdown requested: draining");
            shared.mode.send_replace(Mode::Draining);
        });
    }
    let heartbeat =
        tokio::spawn(heartbeat_loop(shared.clone(), Duration::from_secs(u64::from(registered.heartbeat_interval_seconds.max(1)))));

    let slots = Arc::new(Semaphore::new(config.capacity as usize));
    let mut read_errors = 0u32;
    loop {
        let current = *mode_rx.borrow_and_update();
        match current {
            Mode::Draining => break,
            Mode::Cordoned => {
                let _ = tokio::time::timeout(Duration::from_secs(1), mode_rx.changed()).await;
                continue;
            }
            Mode::Active => {}
        }
        let first = tokio::select! {
            permit = slots.clone().acquire_owned() => permit.map_err(|e| WorkerError::Internal(e.to_string()))?,
            _ = mode_rx.changed() => continue,
        };
        let mut permits = vec![first];
        while let Ok(permit) = slots.clone().try_acquire_owned() {
            permits.push(permit);
        }
        // Not raced against mode changes: dropping a read in flight would
        // strand messages Redis already handed out.
        let deliveries = match shared.consumer.clone().read(permits.len(), READ_BLOCK).await {
            Ok(d) => {
                read_errors = 0;
                d
            }
            Err(e) => {
                if read_errors == 0 {
                    tracing::warn!(error = %e, "cannot read the work streams; retrying");
                }
                read_errors += 1;
                tokio::time::sleep(jitter(Duration::from_millis(200 << read_errors.min(5)))).await;
                continue;
            }
        };
        for (delivery, claimed) in claim_all(&shared, deliveries).await {
            match claimed {
                Some(start) => {
                    // COUNT bounds each stream, not the sum: with several
                    // models a read may bring more than the free slots.
                    let permit = match permits.pop() {
                        Some(permit) => permit,
                        None => slots.clone().acquire_owned().await.map_err(|e| WorkerError::Internal(e.to_string()))?,
                    };
                    tokio::spawn(run_job(shared.clone(), delivery, start, permit));
                }
                None => acknowledge(&shared, &delivery).await,
            }
        }
    }

    drain(&shared, &slots, config.capacity, Duration::from_secs_f64(config.drain_timeout_seconds)).await;
    heartbeat.abort();
    retrying("DeregisterWorker", Duration::from_secs(30), || {
        let mut client = shared.client.clone();
        let worker_id = shared.worker_id.clone();
        async move { client.deregister_worker(pb::DeregisterWorkerRequest { worker_id }).await }
    })
    .await
    .map_err(|status| WorkerError::Rpc { what: "DeregisterWorker", status })?;
    tracing::info!("drained and deregistered");
    Ok(())
}

async fn connect_consumer(target: &flowfarm_queue::RedisTarget, worker_id: &str, lanes: &[String]) -> Consumer {
    let mut pause = Duration::from_millis(200);
    loop {
        match Consumer::connect(target.clone(), worker_id, lanes).await {
            Ok(consumer) => return consumer,
            Err(e) => {
                tracing::warn!(error = %e, "cannot reach Redis; retrying");
                tokio::time::sleep(jitter(pause)).await;
                pause = (pause * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// Claims a read's deliveries with one StartJobs call (per-job StartJob
/// against a coordinator without it). None: nothing to run (refused,
/// malformed); that message is then acknowledged.
async fn claim_all(shared: &Shared, deliveries: Vec<Delivery>) -> Vec<(Delivery, Option<pb::StartJobResponse>)> {
    let mut claimed: Vec<(Delivery, Option<pb::StartJobResponse>)> = Vec::with_capacity(deliveries.len());
    let mut pending = Vec::new();
    // A re-dispatched job may come twice in one read: claim it once.
    let mut seen = std::collections::HashSet::new();
    // A job this worker already renders (a duplicate message): claiming it
    // again would be answered with the running job, and render it twice.
    seen.extend(lock(&shared.running).keys().copied());
    for delivery in deliveries {
        match &delivery.job {
            Ok(message) if seen.insert(message.job_id) => pending.push((message.job_id, delivery)),
            Ok(_) => claimed.push((delivery, None)),
            Err(why) => {
                tracing::warn!(message = %delivery.message_id, %why, "dropping a malformed work message");
                claimed.push((delivery, None));
            }
        }
    }
    let mut rounds = 0;
    let claiming_since = Instant::now();
    while !pending.is_empty() {
        rounds += 1;
        let request =
            pb::StartJobsRequest { worker_id: shared.worker_id.clone(), job_ids: pending.iter().map(|(id, _)| id.to_string()).collect() };
        let answer = retrying("StartJobs", REPORT_PATIENCE, || {
            let mut client = shared.client.clone();
            let request = request.clone();
            async move { client.start_jobs(request).await }
        })
        .await;
        let outcomes = match answer {
            Ok(response) => response.into_inner().outcomes,
            Err(status) if status.code() == Code::Unimplemented => {
                for (_, delivery) in pending.drain(..) {
                    let start = claim_one(shared, &delivery).await;
                    claimed.push((delivery, start));
                }
                break;
            }
            Err(status) => {
                tracing::warn!(code = ?status.code(), reason = %status.message(), "cannot claim a read; leaving it to re-dispatch");
                claimed.extend(pending.drain(..).map(|(_, d)| (d, None)));
                break;
            }
        };
        let mut retry = Vec::new();
        for ((job_id, delivery), outcome) in pending.drain(..).zip(outcomes) {
            match outcome.outcome {
                Some(pb::start_job_outcome::Outcome::Started(start)) => claimed.push((delivery, Some(start))),
                // The coordinator could not reach its database: not an answer.
                // Claims are idempotent, so asking again is safe.
                Some(pb::start_job_outcome::Outcome::Refused(r))
                    if transient_code(Code::from_i32(r.code)) && claiming_since.elapsed() < REPORT_PATIENCE =>
                {
                    retry.push((job_id, delivery));
                }
                refused => {
                    // FAILED_PRECONDITION: a duplicate, cancelled, or passed to another worker.
                    let reason = match refused {
                        Some(pb::start_job_outcome::Outcome::Refused(r)) => r.message,
                        _ => "no outcome".into(),
                    };
                    tracing::debug!(job = %job_id, %reason, "not started");
                    claimed.push((delivery, None));
                }
            }
        }
        if !retry.is_empty() {
            tokio::time::sleep(jitter(Duration::from_millis(100 << rounds.min(6)))).await;
        }
        pending = retry;
    }
    claimed
}

/// StartJob for one delivery, for coordinators without StartJobs.
async fn claim_one(shared: &Shared, delivery: &Delivery) -> Option<pb::StartJobResponse> {
    let message = *delivery.job.as_ref().ok()?;
    let request = pb::StartJobRequest { worker_id: shared.worker_id.clone(), job_id: message.job_id.to_string() };
    let started = retrying("StartJob", REPORT_PATIENCE, || {
        let mut client = shared.client.clone();
        let request = request.clone();
        async move { client.start_job(request).await }
    })
    .await;
    match started {
        Ok(response) => Some(response.into_inner()),
        Err(status) => {
            tracing::debug!(job = %message.job_id, code = ?status.code(), reason = %status.message(), "not started");
            None
        }
    }
}

async fn acknowledge(shared: &Shared, delivery: &Delivery) {
    let mut pause = Duration::from_millis(100);
    for _ in 0..8 {
        match shared.consumer.ack(delivery).await {
            Ok(()) => return,
            Err(e) => {
                tracing::warn!(error = %e, "cannot acknowledge a work message; retrying");
                tokio::time::sleep(jitter(pause)).await;
                pause *= 2;
            }
        }
    }
    // Left pending: the coordinator sweeps it later; the job itself is settled in Postgres.
}

/// One job attempt, in a span of its own (job, batch, attempt, worker) that
/// every log line of the attempt carries and OTLP exports.
async fn run_job(shared: Arc<Shared>, delivery: Delivery, start: pb::StartJobResponse, permit: OwnedSemaphorePermit) {
    let Some(job) = start.job else { return };
    let span =
        tracing::info_span!("job_attempt", job = %job.id, batch = %job.batch_id, attempt = start.attempt, worker = %shared.worker_id);
    run_attempt(shared, delivery, job, start.attempt, permit).instrument(span).await;
}

async fn run_attempt(shared: Arc<Shared>, delivery: Delivery, job: pb::Job, attempt: u32, permit: OwnedSemaphorePermit) {
    let Ok(job_id) = Uuid::parse_str(&job.id) else { return };
    let revoked = Arc::new(AtomicBool::new(false));
    let handed_back = Arc::new(AtomicBool::new(false));
    lock(&shared.running).insert(job_id, RunningJob { attempt, revoked: revoked.clone(), handed_back: handed_back.clone() });
    shared.metrics.busy(1);
    tracing::info!(job = %job_id, attempt, "started");

    let started = Instant::now();
    let outcome = render(&shared, &job, attempt, revoked.clone(), handed_back.clone()).await;
    let seconds = started.elapsed().as_secs_f64();
    let report = match outcome {
        Ok(png) => {
            let model_hash = job.spec.as_ref().and_then(|s| shared.renderers.get(&s.model)).map(|r| r.model_hash()).unwrap_or_default();
            complete(&shared, &job, attempt, png, &model_hash, seconds).await
        }
        Err(EngineError::Cancelled { step }) if handed_back.load(Ordering::SeqCst) => {
            // Handed back: another worker takes it without an attempt used up.
            let why = format!("the worker shut down at step {step} before finishing");
            fail(&shared, &job.id, attempt, &why, pb::FailureCause::WorkerCannot, seconds).await
        }
        Err(EngineError::Cancelled { step }) => {
            tracing::info!(job = %job_id, step, "stopped: the job is no longer this worker's");
            shared.metrics.finished("dropped");
            Ok(())
        }
        Err(e) => {
            // Bad input can only fail again; anything else may be this machine's trouble.
            let cause = match e {
                EngineError::Input(_) | EngineError::TooLarge { .. } => pb::FailureCause::BadInput,
                EngineError::Unserved(_) => pb::FailureCause::WorkerCannot,
                _ => pb::FailureCause::Transient,
            };
            tracing::warn!(job = %job_id, error = %e, ?cause, "render failed");
            fail(&shared, &job.id, attempt, &e.to_string(), cause, seconds).await
        }
    };
    if let Err(status) = report {
        tracing::warn!(job = %job_id, code = ?status.code(), reason = %status.message(), "report refused: dropping the job");
        shared.metrics.finished("dropped");
    }
    acknowledge(&shared, &delivery).await;
    lock(&shared.running).remove(&job_id);
    shared.metrics.busy(-1);
    drop(permit);
}

/// Renders on a blocking thread, reporting each step; a refused report
/// stops the render at the next step.
async fn render(
    shared: &Arc<Shared>,
    job: &pb::Job,
    attempt: u32,
    revoked: Arc<AtomicBool>,
    handed_back: Arc<AtomicBool>,
) -> Result<Vec<u8>, EngineError> {
    let spec = resolved_job(job)?;
    let renderer = shared
        .renderers
        .get(&spec.model)
        .cloned()
        .ok_or_else(|| EngineError::Unserved(format!("this worker does not serve model `{}`", spec.model)))?;
    let handle = tokio::runtime::Handle::current();
    let shared = shared.clone();
    let job_id = job.id.clone();
    // The attempt's span goes along, so the render thread's logs carry its ids.
    let span = tracing::Span::current();
    tokio::task::spawn_blocking(move || {
        let _attempt = span.enter();
        renderer.render_png(&spec, &mut |step, total| {
            if revoked.load(Ordering::SeqCst) || handed_back.load(Ordering::SeqCst) {
                return false;
            }
            let mut client = shared.client.clone();
            let request = pb::ReportProgressRequest {
                worker_id: shared.worker_id.clone(),
                job_id: job_id.clone(),
                attempt,
                step: step as u32,
                total_steps: total as u32,
            };
            match handle.block_on(client.report_progress(request)) {
                Ok(_) => true,
                Err(status) if transient(&status) => true, // the lease outlives a short outage
                Err(status) => {
                    tracing::info!(job = %job_id, reason = %status.message(), "progress refused");
                    revoked.store(true, Ordering::SeqCst);
                    false
                }
            }
        })
    })
    .await
    .map_err(|e| EngineError::Input(format!("render thread failed: {e}")))?
}

async fn complete(shared: &Shared, job: &pb::Job, attempt: u32, png: Vec<u8>, model_hash: &str, seconds: f64) -> Result<(), Status> {
    let job_id = Uuid::parse_str(&job.id).map_err(|e| Status::internal(e.to_string()))?;
    let key = ResultStore::key_for(&job.batch_id, job_id, attempt, &shared.worker_id);
    let stored = match shared.results.put(&key, png).await {
        Ok(stored) => stored,
        Err(e) => {
            tracing::warn!(job = %job_id, error = %e, "cannot store the image");
            return fail(shared, &job.id, attempt, &e.to_string(), pb::FailureCause::Transient, seconds).await;
        }
    };
    let completed = pb::CompletedJob {
        job_id: job.id.clone(),
        attempt,
        result: Some(pb::JobResult {
            key: stored.key,
            sha256: stored.sha256,
            size_bytes: stored.size_bytes,
            content_type: "image/png".into(),
            model_hash: model_hash.to_owned(),
        }),
        gpu_seconds: seconds,
    };
    let answer = shared.completions.call(completed).await.unwrap_or_else(|| Err(Status::cancelled("the worker is shutting down")));
    if let Err(status) = answer {
        // Refused for good (cancelled while the image was written, or the
        // attempt is no longer ours): the object belongs to no job. After a
        // transient error the completion may have been recorded: keep it.
        if !transient(&status) {
            if let Err(e) = shared.results.delete(&key).await {
                tracing::warn!(job = %job_id, %key, error = %e, "cannot remove the image of a refused completion");
            }
        }
        return Err(status);
    }
    tracing::info!(job = %job_id, attempt, seconds, "completed");
    shared.metrics.finished("succeeded");
    shared.metrics.observe_render(seconds);
    Ok(())
}

/// Most completions one CompleteJobs call carries.
const MAX_REPORT_GROUP: usize = 64;

/// Sends completions in groups: one CompleteJobs for all that are waiting,
/// retried while the coordinator is away; each completion gets its own
/// answer. Falls back to CompleteJob against a coordinator without CompleteJobs.
fn completion_reporter(client: Client, worker_id: String) -> Grouper<pb::CompletedJob, Result<(), Status>> {
    Grouper::new(MAX_REPORT_GROUP, move |jobs: Vec<pb::CompletedJob>| {
        let (client, worker_id) = (client.clone(), worker_id.clone());
        async move {
            match report_completions(&client, &worker_id, &jobs).await {
                Some(answers) => answers,
                None => report_completions_one_by_one(&client, &worker_id, jobs).await,
            }
        }
    })
}

/// One CompleteJobs for `jobs`, then again for those refused with a
/// transient code (the coordinator could not reach its database), until
/// each has a definite answer or [`REPORT_PATIENCE`] runs out. A repeated
/// completion of the same attempt is a no-op, so sending one again is safe.
/// None: the coordinator has no CompleteJobs.
async fn report_completions(client: &Client, worker_id: &str, jobs: &[pb::CompletedJob]) -> Option<Vec<Result<(), Status>>> {
    let started = Instant::now();
    let mut answers: Vec<Option<Result<(), Status>>> = vec![None; jobs.len()];
    let mut pause = Duration::from_millis(100);
    loop {
        let open: Vec<usize> = (0..jobs.len()).filter(|&i| answers[i].is_none()).collect();
        let request = pb::CompleteJobsRequest { worker_id: worker_id.to_owned(), jobs: open.iter().map(|&i| jobs[i].clone()).collect() };
        let answer = retrying("CompleteJobs", REPORT_PATIENCE.saturating_sub(started.elapsed()), || {
            let mut client = client.clone();
            let request = request.clone();
            async move { client.complete_jobs(request).await }
        })
        .await;
        let outcomes = match answer {
            Ok(response) => response.into_inner().outcomes,
            Err(status) if status.code() == Code::Unimplemented => return None,
            Err(status) => {
                for &i in &open {
                    answers[i] = Some(Err(status.clone()));
                }
                break;
            }
        };
        let patient = started.elapsed() < REPORT_PATIENCE;
        for (n, &i) in open.iter().enumerate() {
            answers[i] = match outcomes.get(n) {
                Some(pb::CompleteJobOutcome { refused: None }) => Some(Ok(())),
                Some(pb::CompleteJobOutcome { refused: Some(r) }) => {
                    let status = Status::new(Code::from_i32(r.code), r.message.clone());
                    if transient(&status) && patient {
                        None
                    } else {
                        Some(Err(status))
                    }
                }
                None => Some(Err(Status::internal("the coordinator answered fewer completions than were sent"))),
            };
        }
        if answers.iter().all(Option::is_some) {
            break;
        }
        tokio::time::sleep(jitter(pause)).await;
        pause = (pause * 2).min(Duration::from_secs(5));
    }
    Some(answers.into_iter().map(|a| a.unwrap_or_else(|| Err(Status::unavailable("no answer")))).collect())
}

/// CompleteJob per job, for coordinators without CompleteJobs.
async fn report_completions_one_by_one(client: &Client, worker_id: &str, jobs: Vec<pb::CompletedJob>) -> Vec<Result<(), Status>> {
    let mut answers = Vec::with_capacity(jobs.len());
    for job in jobs {
        let request = pb::CompleteJobRequest {
            worker_id: worker_id.to_owned(),
            job_id: job.job_id,
            attempt: job.attempt,
            result: job.result,
            gpu_seconds: job.gpu_seconds,
        };
        let answer = retrying("CompleteJob", REPORT_PATIENCE, || {
            let mut client = client.clone();
            let request = request.clone();
            async move { client.complete_job(request).await }
        })
        .await;
        answers.push(answer.map(|_| ()));
    }
    answers
}

async fn fail(shared: &Shared, job_id: &str, attempt: u32, error: &str, cause: pb::FailureCause, gpu_seconds: f64) -> Result<(), Status> {
    let request = pb::FailJobRequest {
        worker_id: shared.worker_id.clone(),
        job_id: job_id.to_owned(),
        attempt,
        error: error.to_owned(),
        retryable: cause != pb::FailureCause::BadInput,
        cause: cause as i32,
        gpu_seconds,
    };
    retrying("FailJob", REPORT_PATIENCE, || {
        let mut client = shared.client.clone();
        let request = request.clone();
        async move { client.fail_job(request).await }
    })
    .await?;
    shared.metrics.finished("failed");
    Ok(())
}

/// Sends heartbeats: renews leases, learns the operators' wishes, stops
/// revoked jobs.
async fn heartbeat_loop(shared: Arc<Shared>, interval: Duration) {
    let mut failing = false;
    loop {
        tokio::time::sleep(interval).await;
        let running: Vec<pb::RunningJob> =
            lock(&shared.running).iter().map(|(id, r)| pb::RunningJob { job_id: id.to_string(), attempt: r.attempt }).collect();
        // Device time is reported per attempt, with its completion or failure.
        let request = pb::HeartbeatRequest { worker_id: shared.worker_id.clone(), gpu_seconds_delta: 0.0, running };
        match shared.client.clone().heartbeat(request).await {
            Ok(response) => {
                shared.metrics.set_ready(true);
                if failing {
                    tracing::info!("coordinator reachable again");
                    failing = false;
                }
                let response = response.into_inner();
                for id in &response.revoked_job_ids {
                    if let Some(job) = Uuid::parse_str(id).ok().and_then(|id| lock(&shared.running).get(&id).map(|j| j.revoked.clone())) {
                        tracing::info!(job = %id, "revoked by the coordinator");
                        job.store(true, Ordering::SeqCst);
                    }
                }
                let wanted = match pb::WorkerState::try_from(response.state) {
                    Ok(pb::WorkerState::Draining) => Some(Mode::Draining),
                    Ok(pb::WorkerState::Cordoned) => Some(Mode::Cordoned),
                    Ok(pb::WorkerState::Active) => Some(Mode::Active),
                    _ => None,
                };
                if let Some(wanted) = wanted {
                    shared.mode.send_if_modified(|mode| {
                        // A drain, once begun, is not undone.
                        let change = *mode != wanted && *mode != Mode::Draining;
                        if change {
                            tracing::info!(from = ?*mode, to = ?wanted, "state changed by an operator");
                            *mode = wanted;
                        }
                        change
                    });
                }
            }
            Err(status) => {
                shared.metrics.set_ready(false);
                if !failing {
                    tracing::warn!(error = %status.message(), "heartbeat failed; retrying");
                    failing = true;
                }
            }
        }
    }
}

/// Waits for running jobs to finish; at the deadline hands the rest back.
async fn drain(shared: &Shared, slots: &Arc<Semaphore>, capacity: u32, timeout: Duration) {
    let running = lock(&shared.running).len();
    tracing::info!(running, timeout_seconds = timeout.as_secs_f64(), "draining: taking no more work");
    if tokio::time::timeout(timeout, slots.acquire_many(capacity)).await.is_ok() {
        return;
    }
    tracing::warn!("drain deadline passed: handing back the jobs still running");
    for job in lock(&shared.running).values() {
        job.handed_back.store(true, Ordering::SeqCst);
    }
    // They stop at their next step and hand themselves back ("worker cannot").
    let _ = slots.acquire_many(capacity).await;
}

fn total_memory_bytes() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| {
            let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
            let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
            Some(kib * 1024)
        })
        .unwrap_or(0)
}
