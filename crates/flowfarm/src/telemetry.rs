//! Logs and spans: text or JSON lines on stderr (each line with the fields of
//! the spans it is in: rpc, job_attempt and their ids), and with
//! `[tracing] otlp_endpoint` every span exported over OTLP/gRPC as well, with
//! traces carried across calls (W3C Trace Context).

use anyhow::{Context, Result};
use flowfarm_config::TracingConfig;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::LogFormat;

/// What must be flushed before the process exits.
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Sends the spans still buffered; call before exiting.
    pub fn shutdown(self) {
        if let Some(provider) = self.provider {
            if let Err(e) = provider.shutdown() {
                eprintln!("warning: spans not all exported to the OTLP collector: {e}");
            }
        }
    }
}

/// What is logged unless `RUST_LOG` says otherwise: a service's every
/// change at `info`.
pub const SERVICE_LOGS: &str = "info,sqlx=warn";

/// `flowfarm dev`'s terminal is the user's: its own lines, and warnings.
pub const QUIET_LOGS: &str = "warn";

/// Installs the global subscriber: logs in `format` (filtered by `RUST_LOG`,
/// else `default_filter`), and spans to the OTLP collector of `tracing` if it
/// names one (as `default_service`, unless it names another service).
///
/// # Errors
/// An OTLP endpoint that cannot be used.
pub fn init(format: LogFormat, tracing: &TracingConfig, default_service: &str, default_filter: &str) -> Result<Telemetry> {
    let filter = || EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    use std::io::IsTerminal;
    let ansi = std::io::stderr().is_terminal();
    let logs = match format {
        LogFormat::Text => tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_ansi(ansi).boxed(),
        LogFormat::Json => {
            tracing_subscriber::fmt::layer().json().with_current_span(true).with_span_list(true).with_writer(std::io::stderr).boxed()
        }
    };
    let (spans, provider) = match &tracing.otlp_endpoint {
        None => (None, None),
        Some(endpoint) => {
            let exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(endpoint.clone())
                .build()
                .with_context(|| format!("tracing.otlp_endpoint `{endpoint}` cannot be used"))?;
            let service = tracing.service_name.clone().unwrap_or_else(|| default_service.to_owned());
            let provider = SdkTracerProvider::builder()
                .with_batch_exporter(exporter)
                .with_resource(opentelemetry_sdk::Resource::builder().with_service_name(service).build())
                .build();
            // Exported whatever RUST_LOG says of the logs: flowfarm's spans,
            // and only warnings of the libraries (the exporter's own included).
            let exported = EnvFilter::new("warn,flowfarm=info,flowfarm_coordinator=info,flowfarm_worker=info,flowfarm_store=info");
            let layer = tracing_opentelemetry::layer().with_tracer(provider.tracer("flowfarm")).with_filter(exported);
            // Calls carry their span's trace (W3C traceparent) and the
            // coordinator continues it: a job attempt's calls are one trace.
            opentelemetry::global::set_text_map_propagator(opentelemetry_sdk::propagation::TraceContextPropagator::new());
            (Some(layer), Some(provider))
        }
    };
    tracing_subscriber::registry().with(logs.with_filter(filter())).with(spans).init();
    Ok(Telemetry { provider })
}
