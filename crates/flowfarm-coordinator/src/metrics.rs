//! Prometheus metrics of a coordinator, served as text on `/metrics`.
//!
//! Counters and histograms are updated as RPCs happen on this coordinator;
//! the job, worker and per-submitter GPU-seconds gauges are read from
//! Postgres at each scrape, so they describe the whole farm whichever replica
//! is scraped.

use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::Coordinator;

type Labels = Vec<(&'static str, String)>;

/// The coordinator's metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Submission to StartJob of a job's first attempt.
    pub submit_to_start: Histogram,
    /// Device time per completed job, as the worker reported it.
    pub render_seconds: Histogram,
    /// Failed attempts by reason: `bad_input`, `worker_cannot`, `transient`, `lease_expired`.
    pub failures: Family<Labels, Counter>,
    pub dispatched: Counter,
    pub redispatched: Counter,
    pub completed: Counter,
    jobs: Family<Labels, Gauge>,
    workers: Family<Labels, Gauge>,
    submitter_gpu_seconds: Family<Labels, Gauge<f64, AtomicU64>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("flowfarm");
        let submit_to_start = Histogram::new(exponential_buckets(0.001, 2.0, 20));
        let render_seconds = Histogram::new(exponential_buckets(0.01, 2.0, 18));
        let failures = Family::<Labels, Counter>::default();
        let (dispatched, redispatched, completed) = (Counter::default(), Counter::default(), Counter::default());
        let jobs = Family::<Labels, Gauge>::default();
        let workers = Family::<Labels, Gauge>::default();
        registry.register("submit_to_start_seconds", "Submission to start of a job's first attempt", submit_to_start.clone());
        registry.register("render_seconds", "Device seconds per completed job, as workers report", render_seconds.clone());
        registry.register(
            "job_failures",
            "Failed attempts by reason (bad_input, worker_cannot, transient, lease_expired)",
            failures.clone(),
        );
        registry.register("jobs_dispatched", "Jobs handed to the work streams", dispatched.clone());
        registry.register("jobs_redispatched", "Jobs dispatched again after their message was not taken in time", redispatched.clone());
        registry.register("jobs_completed", "Jobs completed through this coordinator", completed.clone());
        registry.register("jobs", "Jobs per model and state (whole farm, read at scrape)", jobs.clone());
        registry.register("workers", "Workers per state (whole farm, read at scrape)", workers.clone());
        // Every reason at 0 from the start: a series that appears only with its
        // first failure makes rate() and alerts blind until then.
        for reason in ["bad_input", "worker_cannot", "transient", "lease_expired"] {
            let _ = failures.get_or_create(&vec![("reason", reason.to_owned())]);
        }
        let submitter_gpu_seconds = Family::<Labels, Gauge<f64, AtomicU64>>::default();
        registry.register(
            "submitter_gpu_seconds",
            "GPU-seconds used by each submitter's jobs (whole farm, read at scrape)",
            submitter_gpu_seconds.clone(),
        );
        Metrics {
            registry,
            submit_to_start,
            render_seconds,
            failures,
            dispatched,
            redispatched,
            completed,
            jobs,
            workers,
            submitter_gpu_seconds,
        }
    }

    pub fn failure(&self, reason: &'static str) {
        self.failures.get_or_create(&vec![("reason", reason.to_owned())]).inc();
    }

    /// The text exposition, after reading the farm-wide gauges from the store.
    async fn render(&self, coordinator: &Coordinator) -> Result<String, flowfarm_store::StoreError> {
        let store = &coordinator.shared.store;
        self.jobs.clear();
        for stats in store.queue_stats(None).await? {
            let c = stats.counts;
            for (state, n) in [
                ("queued", c.queued),
                ("dispatched", c.dispatched),
                ("running", c.running),
                ("succeeded", c.succeeded),
                ("failed", c.failed),
                ("cancelled", c.cancelled),
                ("dead", c.dead),
            ] {
                self.jobs.get_or_create(&vec![("model", stats.model.clone()), ("state", state.to_owned())]).set(n as i64);
            }
        }
        self.workers.clear();
        for state in ["active", "draining", "cordoned", "lost"] {
            self.workers.get_or_create(&vec![("state", state.to_owned())]).set(0);
        }
        for worker in store.list_workers(false).await? {
            self.workers.get_or_create(&vec![("state", worker.state.as_str().to_owned())]).inc();
        }
        self.submitter_gpu_seconds.clear();
        for (submitter, seconds) in store.gpu_seconds_by_submitter().await? {
            self.submitter_gpu_seconds.get_or_create(&vec![("submitter", submitter)]).set(seconds);
        }
        let mut out = String::new();
        encode(&mut out, &self.registry).map_err(|e| flowfarm_store::StoreError::Corrupt(format!("encoding metrics: {e}")))?;
        Ok(out)
    }
}

async fn scrape(State(coordinator): State<Coordinator>) -> impl IntoResponse {
    match coordinator.shared.metrics.render(&coordinator).await {
        Ok(text) => (StatusCode::OK, [(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], text),
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, [(header::CONTENT_TYPE, "text/plain; charset=utf-8")], format!("{e}\n")),
    }
}

/// `/healthz`: the process answers.
async fn live() -> &'static str {
    "ok\n"
}

/// `/readyz`: Postgres and Redis answer (what gRPC health says), for probes
/// that cannot speak gRPC over TLS.
async fn ready(State(coordinator): State<Coordinator>) -> (StatusCode, String) {
    match coordinator.not_ready() {
        None => (StatusCode::OK, "ready\n".into()),
        Some(problem) => (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {problem}\n")),
    }
}

/// Serves `/metrics`, `/healthz` and `/readyz` on `listener` until `shutdown` is cancelled.
///
/// # Errors
/// The listener's I/O error.
pub async fn serve_metrics(coordinator: Coordinator, listener: TcpListener, shutdown: CancellationToken) -> std::io::Result<()> {
    let app = axum::Router::new()
        .route("/metrics", axum::routing::get(scrape))
        .route("/healthz", axum::routing::get(live))
        .route("/readyz", axum::routing::get(ready))
        .with_state(coordinator);
    axum::serve(listener, app).with_graceful_shutdown(shutdown.cancelled_owned()).await
}

/// Binds `addr` for [`serve_metrics`], saying which key to change when it fails.
///
/// # Errors
/// The bind error, with context.
pub async fn bind_metrics(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await.map_err(|e| {
        std::io::Error::new(e.kind(), format!("cannot serve metrics on {addr} (metrics.listen / FLOWFARM_METRICS_LISTEN): {e}"))
    })
}
