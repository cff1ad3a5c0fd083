//! Prometheus metrics of a worker, served as text on `/metrics`.

use std::sync::Arc;

use axum::extract::State;
use axum::http::header;
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
    cache_hits: Counter,
    cache_misses: Counter,
    cache_bytes: Gauge,
    cache: Arc<EmbeddingCache>,
}

impl WorkerMetrics {
    pub fn new(cache: Arc<EmbeddingCache>) -> Self {
        let mut registry = Registry::with_prefix("flowfarm_worker");
        let jobs = Family::<Labels, Counter>::default();
        let busy = Gauge::default();
        let render_seconds = Histogram::new(exponential_buckets(0.01, 2.0, 18));
        let (cache_hits, cache_misses, cache_bytes) = (Counter::default(), Counter::default(), Gauge::default());
        registry.register("jobs", "Jobs finished here, by outcome (succeeded, failed, dropped)", jobs.clone());
        registry.register("busy_slots", "Jobs rendering now", busy.clone());
        registry.register("render_seconds", "Wall time per rendered job, claim to stored image", render_seconds.clone());
        registry.register("embedding_cache_hits", "Text encodings served from the L1 cache", cache_hits.clone());
        registry.register("embedding_cache_misses", "Text encodings computed", cache_misses.clone());
        registry.register("embedding_cache_bytes", "Bytes held by the L1 cache", cache_bytes.clone());
        WorkerMetrics { inner: Arc::new(Inner { registry, jobs, busy, render_seconds, cache_hits, cache_misses, cache_bytes, cache }) }
    }

    pub(crate) fn finished(&self, outcome: &'static str) {
        self.inner.jobs.get_or_create(&vec![("outcome", outcome.to_owned())]).inc();
    }

    pub(crate) fn busy(&self, delta: i64) {
        self.inner.busy.inc_by(delta);
    }

    pub(crate) fn observe_render(&self, seconds: f64) {
        self.inner.render_seconds.observe(seconds);
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

/// Serves `/metrics` on `listener` for as long as the process runs.
pub async fn serve(metrics: WorkerMetrics, listener: TcpListener) {
    let app = axum::Router::new().route("/metrics", axum::routing::get(scrape)).with_state(metrics);
    if let Err(e) = axum::serve(listener, app).await {
        tracing::error!(error = %e, "metrics server stopped");
    }
}
