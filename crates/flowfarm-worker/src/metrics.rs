//! Prometheus metrics of a worker, served as text on `/metrics`, beside the
//! probes: `/healthz` (the process answers: live) and `/readyz` (its models
//! are loaded, it is registered, and its last heartbeat reached the
//! coordinator: ready).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use flowfarm_engine::cache::EmbeddingCache;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

type Labels = Vec<(&'static str, String)>;

/// A worker's metrics; cheap to clone (shared).
#[derive(Clone)]
pub struct WorkerMetrics {
    inner: Arc<Inner>,
}

struct Inner {
    registry: Registry,
    jobs: Family<Labels, Counter>,
    busy: Gauge,
    render_seconds: Histogram,
    render_jobs: Histogram,
    cache_hits: Counter,
    cache_misses: Counter,
    cache_bytes: Gauge,
    cache: Arc<EmbeddingCache>,
    ready: AtomicBool,
    /// Per device: seconds spent rendering, and its memory.
    device_busy: Family<Labels, Counter<f64, AtomicU64>>,
    device_memory: Family<Labels, Gauge>,
}

impl WorkerMetrics {
    pub fn new(cache: Arc<EmbeddingCache>) -> Self {
        let mut registry = Registry::with_prefix("flowfarm_worker");
        let jobs = Family::<Labels, Counter>::default();
        let busy = Gauge::default();
        let render_seconds = Histogram::new(exponential_buckets(0.01, 2.0, 18));
        let render_jobs = Histogram::new([1.0, 2.0, 4.0, 8.0, 16.0]);
        let (cache_hits, cache_misses, cache_bytes) = (Counter::default(), Counter::default(), Gauge::default());
        registry.register("jobs", "Jobs finished here, by outcome (succeeded, failed, dropped)", jobs.clone());
        registry.register("busy_slots", "Jobs rendering now", busy.clone());
        registry.register(
            "render_seconds",
            "Wall time per render that made an image (a batch of jobs, or one), start to last image",
            render_seconds.clone(),
        );
        registry.register("render_jobs", "Jobs sampled together per render that made an image (cross-job batches)", render_jobs.clone());
        registry.register("embedding_cache_hits", "Text encodings served from the L1 cache", cache_hits.clone());
        registry.register("embedding_cache_misses", "Text encodings computed", cache_misses.clone());
        registry.register("embedding_cache_bytes", "Bytes held by the L1 cache", cache_bytes.clone());
        // Every outcome at 0 from the start, so rates and alerts see the series before its first event.
        for outcome in ["succeeded", "failed", "dropped"] {
            let _ = jobs.get_or_create(&vec![("outcome", outcome.to_owned())]);
        }
        let device_busy = Family::<Labels, Counter<f64, AtomicU64>>::default();
        let device_memory = Family::<Labels, Gauge>::default();
        registry.register("device_busy_seconds", "Seconds each device spent rendering jobs", device_busy.clone());
        registry.register("device_memory_bytes", "Memory of each device (the host's for the CPU)", device_memory.clone());
        let ready = AtomicBool::new(false);
        WorkerMetrics {
            inner: Arc::new(Inner {
                registry,
                jobs,
                busy,
                render_seconds,
                render_jobs,
                cache_hits,
                cache_misses,
                cache_bytes,
                cache,
                ready,
                device_busy,
                device_memory,
            }),
        }
    }

    /// Ready: models loaded, registered, and the coordinator answered the
    /// last heartbeat.
    pub(crate) fn set_ready(&self, ready: bool) {
        self.inner.ready.store(ready, Ordering::SeqCst);
    }

    pub(crate) fn finished(&self, outcome: &'static str) {
        self.inner.jobs.get_or_create(&vec![("outcome", outcome.to_owned())]).inc();
    }

    pub(crate) fn busy(&self, delta: i64) {
        self.inner.busy.inc_by(delta);
    }

    /// A device this worker renders on, and its memory in bytes.
    pub(crate) fn add_device(&self, name: &str, memory_bytes: u64) {
        self.inner.device_memory.get_or_create(&vec![("device", name.to_owned())]).set(memory_bytes.min(i64::MAX as u64) as i64);
        let _ = self.inner.device_busy.get_or_create(&vec![("device", name.to_owned())]);
    }

    /// A render of `jobs` jobs together, `seconds` long, that made an
    /// image, on every device in `devices` (one, a CFG pair, or a block
    /// pipeline's).
    pub(crate) fn observe_render(&self, devices: &[String], seconds: f64, jobs: usize) {
        self.inner.render_seconds.observe(seconds);
        self.inner.render_jobs.observe(jobs as f64);
        for device in devices {
            self.inner.device_busy.get_or_create(&vec![("device", device.clone())]).inc_by(seconds);
        }
    }

    /// The text exposition.
    pub fn render(&self) -> String {
        let inner = &self.inner;
        let stats = inner.cache.stats();
        // The cache counts by itself; bring the counters up to its figures.
        inner.cache_hits.inc_by(stats.hits.saturating_sub(inner.cache_hits.get()));
        inner.cache_misses.inc_by(stats.misses.saturating_sub(inner.cache_misses.get()));
        inner.cache_bytes.set(stats.bytes as i64);
        let mut out = String::new();
        if encode(&mut out, &inner.registry).is_err() {
            out = "# metrics could not be encoded\n".into();
        }
        out
    }
}

async fn scrape(State(metrics): State<WorkerMetrics>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], metrics.render())
}

async fn ready(State(metrics): State<WorkerMetrics>) -> impl IntoResponse {
    if metrics.inner.ready.load(Ordering::SeqCst) {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready: loading its models, or the coordinator did not answer the last heartbeat\n")
    }
}

/// Serves `/metrics`, `/healthz` and `/readyz` on `listener` until `stop`
/// is cancelled (once the worker has deregistered).
pub async fn serve(metrics: WorkerMetrics, listener: TcpListener, stop: tokio_util::sync::CancellationToken) {
    let app = axum::Router::new()
        .route("/metrics", axum::routing::get(scrape))
        .route("/healthz", axum::routing::get(|| async { "ok\n" }))
        .route("/readyz", axum::routing::get(ready))
        .with_state(metrics);
    if let Err(e) = axum::serve(listener, app).with_graceful_shutdown(stop.cancelled_owned()).await {
        tracing::error!(error = %e, "metrics server stopped");
    }
}
