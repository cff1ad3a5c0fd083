//! One tracing span per RPC, carrying the ids the call is about (caller,
//! worker, batch, job, attempt) once the handler knows them, so that every
//! log line of the call and the span exported over OTLP can be found by them.
//! A call that carries its caller's trace (W3C `traceparent`: a worker's job
//! attempt) gets a span in that trace, as its child.

use opentelemetry::propagation::Extractor;
use tonic::codegen::http;
use tracing::field::Empty;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use uuid::Uuid;

/// A request's headers, as the trace propagator reads them.
struct Headers<'a>(&'a http::HeaderMap);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

/// The span of one call, entered for as long as the handler runs.
pub(crate) fn rpc_span(request: &http::Request<()>) -> tracing::Span {
    let span = tracing::info_span!(
        "rpc",
        method = %request.uri().path(),
        caller = Empty,
        worker = Empty,
        batch = Empty,
        job = Empty,
        attempt = Empty,
    );
    // Only workers' calls continue a trace: the header is read before the
    // caller is authenticated, and nobody else's calls belong in a
    // worker's trace. Without OTLP no propagator is installed and the
    // context is empty.
    if request.uri().path().starts_with("/flowfarm.v1.WorkerService/") {
        let parent = opentelemetry::global::get_text_map_propagator(|p| p.extract(&Headers(request.headers())));
        let _ = span.set_parent(parent);
    }
    span
}

/// Records on the current call's span who is calling.
pub(crate) fn caller(actor: &str) {
    tracing::Span::current().record("caller", actor);
}

/// Records on the current call's span the ids it is about.
pub(crate) fn ids(worker: Option<Uuid>, batch: Option<Uuid>, job: Option<Uuid>, attempt: Option<u32>) {
    let span = tracing::Span::current();
    if let Some(worker) = worker {
        span.record("worker", tracing::field::display(worker));
    }
    if let Some(batch) = batch {
        span.record("batch", tracing::field::display(batch));
    }
    if let Some(job) = job {
        span.record("job", tracing::field::display(job));
    }
    if let Some(attempt) = attempt {
        span.record("attempt", attempt);
    }
}
