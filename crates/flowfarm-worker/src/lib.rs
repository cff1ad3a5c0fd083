//! flowfarm's worker daemon: reads its models' work streams, claims jobs
//! from the coordinator (StartJob: lease and attempt), renders them with
//! flowfarm-engine, stores the PNGs, reports progress and the outcome, and
//! acknowledges the messages. Heartbeats renew its leases and bring the
//! operators' cordon and drain; SIGTERM drains with a deadline.
//!
//! - [`config`]: the TOML config and its environment overrides.
//! - [`render`]: one job, prompt to PNG bytes.
//! - [`run`]: the daemon itself; [`run_with`] reads work from another
//!   [`WorkSource`] than Redis (the in-process queue).

pub mod config;
mod daemon;
pub mod metrics;
pub mod render;

pub use config::{ModelEntry, WorkerConfig, WorkerConfigError};
pub use daemon::{run, run_with, MakeSource, WorkSource};

/// Why a worker could not start or could not deregister.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("config: {0}")]
    Config(String),
    #[error("loading model `{name}`: {source}")]
    Model { name: String, source: flowfarm_engine::EngineError },
    #[error(transparent)]
    Results(#[from] flowfarm_results::ResultError),
    #[error("{what}: {} ({:?})", status.message(), status.code())]
    Rpc { what: &'static str, status: tonic::Status },
    #[error("internal: {0}")]
    Internal(String),
}
