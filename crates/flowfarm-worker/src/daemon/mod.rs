//! The worker daemon's life: register, heartbeat, read the work streams,
//! claim, render, store, report, acknowledge; cordon and drain on request.
//!
//! Nothing here is the truth about a job: the coordinator is. A refused
//! report (FAILED_PRECONDITION: cancelled, requeued, lease lost) means the
//! job is no longer this worker's, and the work is dropped.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use flowfarm_engine::cache::EmbeddingCache;
use flowfarm_group::Grouper;
use flowfarm_proto::client::{endpoint, BearerToken};
use flowfarm_proto::v1 as pb;
use flowfarm_proto::v1::worker_service_client::WorkerServiceClient;
use flowfarm_queue::{Consumer, JobSource};
use tokio::sync::{watch, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Code, Status};
use uuid::Uuid;

use crate::config::{hostname, WorkerConfig};
use crate::metrics::WorkerMetrics;
use crate::WorkerError;
use flowfarm_results::ResultStore;

// One concern each: claiming deliveries, one attempt's render and report,
// grouped completion reports, heartbeats.
mod attempt;
mod claim;
mod devices;
mod heartbeat;
mod reports;

use attempt::run_batch;
use claim::{acknowledge, claim_all};
use heartbeat::heartbeat_loop;
use reports::completion_reporter;

/// Longest wait on the streams before the loop looks at its state again.
const READ_BLOCK: Duration = Duration::from_millis(500);
/// How long a report is retried while the coordinator is away.
const REPORT_PATIENCE: Duration = Duration::from_secs(300);

type Client = WorkerServiceClient<InterceptedService<Channel, Traced>>;

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
    /// Where jobs render: every model on each device.
    devices: devices::Devices,
    results: ResultStore,
    consumer: Arc<dyn JobSource>,
    metrics: WorkerMetrics,
    /// Completions that finish while a report is in flight go in the next
    /// CompleteJobs together.
    completions: Grouper<pb::CompletedJob, Result<(), Status>>,
}

/// The worker's token on every call, and the current span's trace (W3C
/// `traceparent`), so a job attempt's calls show in the coordinator's spans
/// as the attempt's children. Without OTLP nothing is added.
#[derive(Clone)]
struct Traced(BearerToken);

/// Call metadata, as the trace propagator writes it.
struct Metadata<'a>(&'a mut tonic::metadata::MetadataMap);

impl opentelemetry::propagation::Injector for Metadata<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(key), Ok(value)) =
            (tonic::metadata::MetadataKey::from_bytes(key.as_bytes()), tonic::metadata::MetadataValue::try_from(value.as_str()))
        {
            self.0.insert(key, value);
        }
    }
}

impl tonic::service::Interceptor for Traced {
    fn call(&mut self, request: tonic::Request<()>) -> Result<tonic::Request<()>, Status> {
        use tracing_opentelemetry::OpenTelemetrySpanExt;
        let mut request = self.0.call(request)?;
        let context = tracing::Span::current().context();
        opentelemetry::global::get_text_map_propagator(|p| p.inject_context(&context, &mut Metadata(request.metadata_mut())));
        Ok(request)
    }
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
    Fut: std::future::Future<Output = Result<T, Status>>,
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

/// Runs a worker until it has drained: after `shutdown` is cancelled
/// (SIGTERM) or an operator drains it, it takes no more work, lets running
/// jobs finish for `drain_timeout_seconds`, hands back what is left,
/// deregisters and returns, once every task it spawned has ended.
///
/// # Errors
/// [`WorkerError`] if a model cannot be loaded, the token is refused, or
/// registration fails for good.
pub async fn run(config: WorkerConfig, shutdown: CancellationToken) -> Result<(), WorkerError> {
    run_with(config, WorkSource::Redis, shutdown).await
}

/// Makes a worker's reader from its id and the lanes it serves.
pub type MakeSource = Box<dyn Fn(&str, &[String]) -> Arc<dyn JobSource> + Send + Sync>;

/// Where a worker reads its work from.
pub enum WorkSource {
    /// The Redis Streams of `redis_url` in its config.
    Redis,
    /// A reader made for the worker once it has registered, from its id
    /// and the lanes it serves: the in-process queue of a farm that runs in
    /// one process.
    Given(MakeSource),
}

/// [`run`], reading work from `source`.
///
/// # Errors
/// As [`run`].
pub async fn run_with(config: WorkerConfig, source: WorkSource, shutdown: CancellationToken) -> Result<(), WorkerError> {
    let tasks = TaskTracker::new();
    // Ends what lives as long as the worker (its metrics, the drain watch).
    let stopped = CancellationToken::new();
    let ran = serve(config, source, shutdown, &tasks, &stopped).await;
    stopped.cancel();
    tasks.close();
    tasks.wait().await;
    ran
}

async fn serve(
    config: WorkerConfig,
    source: WorkSource,
    shutdown: CancellationToken,
    tasks: &TaskTracker,
    stopped: &CancellationToken,
) -> Result<(), WorkerError> {
    let cache = Arc::new(EmbeddingCache::new(config.embedding_cache_bytes));
    // Served from the start, so a liveness probe answers while large models load.
    let metrics = WorkerMetrics::new(cache.clone());
    if let Some(addr) = config.metrics_listen {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| WorkerError::Config(format!("cannot serve metrics on {addr} (metrics_listen): {e}")))?;
        println!("metrics on {}", listener.local_addr().map_err(|e| WorkerError::Internal(e.to_string()))?);
        tasks.spawn(crate::metrics::serve(metrics.clone(), listener, stopped.clone()));
    }
    let devices = devices::open(&config, cache.clone(), &metrics).await?;
    let slots_total = devices.slots;
    let results = ResultStore::open(config.results_url.as_deref(), &config.results_dir)?;
    let token = BearerToken::new(&config.token).map_err(|e| WorkerError::Config(format!("token: {e}")))?;
    let channel = endpoint(&config.coordinator, &config.client_tls())
        .map_err(|e| WorkerError::Config(format!("coordinator `{}`: {e}", config.coordinator)))?
        .connect_lazy();
    let client = WorkerServiceClient::with_interceptor(channel, Traced(token));

    let all_t5 = devices.models.values().all(|m| m.renderer().has_t5());
    let mut sets = vec![pb::TextEncoderSet::ClipOnly as i32];
    if all_t5 {
        sets.insert(0, pb::TextEncoderSet::All as i32);
    }
    let name = config.worker_name();
    let register = pb::RegisterWorkerRequest {
        name: name.clone(),
        hostname: hostname(),
        // Memory: the host's for the CPU; 0 if a GPU's is not known.
        devices: devices.states(),
        models: config.models.iter().map(|m| m.name.clone()).collect(),
        model_hashes: devices.models.iter().map(|(name, m)| (name.clone(), m.renderer().model_hash())).collect(),
        placements: devices.placements(config.max_batch.max(1)),
        text_encoder_sets: sets,
        // Jobs at once: a batch in each of every device's slots.
        capacity: slots_total * config.max_batch.max(1),
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
    tracing::info!(worker = %worker_id, %name, capacity = slots_total, devices = devices.list.len(), "registered");

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
    let consumer: Arc<dyn JobSource> = match source {
        WorkSource::Redis => Arc::new(connect_consumer(&config.redis_target(), &worker_id, &lanes).await),
        WorkSource::Given(make) => make(&worker_id, &lanes),
    };
    metrics.set_ready(true);
    let (mode, mut mode_rx) = watch::channel(Mode::Active);
    let completions = completion_reporter(client.clone(), worker_id.clone());
    let shared =
        Arc::new(Shared { client, worker_id, completions, running: Mutex::new(HashMap::new()), mode, devices, results, consumer, metrics });
    {
        let shared = shared.clone();
        let stopped = stopped.clone();
        tasks.spawn(async move {
            tokio::select! {
                () = shutdown.cancelled() => {
                    tracing::info!("shutdown requested: draining");
                    shared.mode.send_replace(Mode::Draining);
                }
                () = stopped.cancelled() => {}
            }
        });
    }
    let heartbeats = stopped.child_token();
    let interval = Duration::from_secs(u64::from(registered.heartbeat_interval_seconds.max(1)));
    tasks.spawn(heartbeat_loop(shared.clone(), interval, heartbeats.clone()));

    // A permit per render; each render samples up to `max_batch` jobs.
    let slots = Arc::new(Semaphore::new(slots_total as usize));
    let max_batch = config.max_batch.max(1) as usize;
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
        let deliveries = match shared.consumer.read(permits.len() * max_batch, READ_BLOCK).await {
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
        let mut started = Vec::new();
        for (delivery, claimed) in claim_all(&shared, deliveries).await {
            match claimed {
                Some(start) => started.push((delivery, start)),
                None => acknowledge(&shared, &delivery).await,
            }
        }
        for batch in batches(started, max_batch) {
            // COUNT bounds each stream, not the sum, and jobs that cannot
            // share a batch need a slot each: a read may bring more
            // renders than the free slots.
            let permit = match permits.pop() {
                Some(permit) => permit,
                None => slots.clone().acquire_owned().await.map_err(|e| WorkerError::Internal(e.to_string()))?,
            };
            tasks.spawn(run_batch(shared.clone(), batch, permit));
        }
    }

    drain(&shared, &slots, slots_total, Duration::from_secs_f64(config.drain_timeout_seconds)).await;
    heartbeats.cancel();
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

/// Groups started jobs into renders: jobs of one model, size and
/// text-encoder set share a batch of up to `max_batch`, in the order they
/// came (the streams' priority order).
fn batches(
    started: Vec<(flowfarm_queue::Delivery, pb::StartJobResponse)>,
    max_batch: usize,
) -> Vec<Vec<(flowfarm_queue::Delivery, pb::StartJobResponse)>> {
    type Key = (String, u32, u32, i32);
    let key = |start: &pb::StartJobResponse| -> Key {
        let spec = start.job.as_ref().and_then(|j| j.spec.as_ref());
        spec.map(|s| (s.model.clone(), s.width, s.height, s.text_encoders)).unwrap_or_default()
    };
    let mut open: Vec<(Key, Vec<(flowfarm_queue::Delivery, pb::StartJobResponse)>)> = Vec::new();
    let mut full = Vec::new();
    for (delivery, start) in started {
        let k = key(&start);
        let at = match open.iter().position(|(o, _)| *o == k) {
            Some(at) => at,
            None => {
                open.push((k, Vec::new()));
                open.len() - 1
            }
        };
        open[at].1.push((delivery, start));
        if open[at].1.len() == max_batch {
            full.push(open.remove(at).1);
        }
    }
    full.extend(open.into_iter().map(|(_, batch)| batch));
    full
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
