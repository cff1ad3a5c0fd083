//! One tracing span per RPC, carrying the ids the call is about (caller,
//! worker, batch, job, attempt) once the handler knows them, so that every
//! log line of the call and the span exported over OTLP can be found by them.

use tracing::field::Empty;
use uuid::Uuid;

/// The span of one call, entered for as long as the handler runs.
pub(crate) fn rpc_span(request: &tonic::codegen::http::Request<()>) -> tracing::Span {
    tracing::info_span!(
        "rpc",
        method = %request.uri().path(),
        caller = Empty,
        worker = Empty,
        batch = Empty,
        job = Empty,
        attempt = Empty,
    )
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
