//! flowfarm's coordinator: the three gRPC services (render, admin, worker),
//! bearer-token auth, the dispatcher into Redis, the lease reaper, metrics,
//! and the config they run from.
//!
//! Every RPC checks its caller's role, validates its input (INVALID_ARGUMENT
//! names the field), and goes to the [`Store`], which keeps the whole truth.
//! Nothing here holds job state in memory; step progress goes through the
//! store's notifications to the WatchBatch streams of every coordinator.
//!
//! [`serve`] runs everything on a listener until a shutdown future resolves.

mod admin;
pub mod auth;
pub mod config;
pub mod convert;
pub mod dispatcher;
mod health;
pub mod metrics;
mod progress;
mod reaper;
mod render;
mod server;
mod spans;
pub mod status_page;
pub mod sweeper;
pub mod tls;
pub mod tokens;
mod watch;
mod worker;

use std::sync::Arc;

use flowfarm_core::{Limits, ModelRegistry};
use flowfarm_group::Grouper;
use flowfarm_proto::v1 as pb;
use flowfarm_store::Store;
use tokio::sync::{broadcast, Notify};
use uuid::Uuid;

pub use config::{Config, ConfigError};
pub use dispatcher::{DispatchError, Dispatcher};
pub use metrics::{bind_metrics, serve_metrics, Metrics};
pub use reaper::{reap_once, run_reaper};
pub use server::{serve, ServeError};
pub use status_page::{bind_status_page, serve_status_page};

use crate::auth::Authenticator;
use crate::config::{LeaseConfig, QueueConfig};

/// Step progress of one job, fanned out to watchers.
#[derive(Debug, Clone)]
struct Progress {
    batch_id: Uuid,
    event: pb::JobProgress,
}

/// What every service shares.
#[derive(Debug)]
struct Shared {
    store: Arc<dyn Store>,
    registry: ModelRegistry,
    limits: Limits,
    leases: LeaseConfig,
    results: flowfarm_results::ResultStore,
    /// Zero: no sweep of orphaned result objects.
    results_sweep_interval: std::time::Duration,
    shutdown_grace: std::time::Duration,
    auth: Authenticator,
    progress: broadcast::Sender<Progress>,
    queue: QueueConfig,
    metrics: Metrics,
    /// Wakes the dispatcher: work arrived or a slot freed up.
    dispatch_wake: Arc<Notify>,
    /// Concurrent StartJob calls, one statement per group.
    starts: Grouper<(Uuid, Uuid), Result<flowfarm_store::JobRow, flowfarm_store::StoreError>>,
    /// The token each worker registered with (None: registered before
    /// tokens were recorded); set once at registration, so never stale.
    worker_tokens: std::sync::Mutex<std::collections::HashMap<Uuid, Option<Uuid>>>,
    /// Concurrent CompleteJob calls, one statement per group.
    completions: Grouper<flowfarm_store::Completion, Result<(), flowfarm_store::StoreError>>,
    /// TLS of the gRPC server; None: plaintext.
    tls: Option<Arc<tls::ServerTls>>,
    /// Why the coordinator cannot work (a dependency does not answer); None: it can.
    not_ready: std::sync::Mutex<Option<String>>,
    /// Every task the services spawn (background loops, watch streams,
    /// result streams, TLS handshakes): [`serve`] waits for them.
    tasks: tokio_util::task::TaskTracker,
}

/// Most calls answered by one grouped statement.
const MAX_GROUP: usize = 512;
/// Grouped statements of one kind running at once: while one waits for its
/// commit, the next group forms and runs. Rows are locked in id order, so
/// groups do not deadlock one another.
const GROUPS_IN_FLIGHT: usize = 4;

fn start_grouper(
    store: Arc<dyn Store>,
    lease: std::time::Duration,
) -> Grouper<(Uuid, Uuid), Result<flowfarm_store::JobRow, flowfarm_store::StoreError>> {
    Grouper::new(MAX_GROUP, move |requests: Vec<(Uuid, Uuid)>| {
        let store = store.clone();
        async move {
            let started = match store.start_jobs(&requests, lease).await {
                Ok(started) => started,
                Err(e) => {
                    tracing::warn!(error = %e, "grouped StartJob failed; taking the calls one by one");
                    vec![None; requests.len()]
                }
            };
            let mut out = Vec::with_capacity(requests.len());
            for ((job, worker), row) in requests.into_iter().zip(started) {
                // Not started by the group: the single path says why (and declines).
                out.push(match row {
                    Some(row) => Ok(row),
                    None => store.start_job(job, worker, lease).await,
                });
            }
            out
        }
    })
    .in_flight(GROUPS_IN_FLIGHT)
}

fn completion_grouper(store: Arc<dyn Store>) -> Grouper<flowfarm_store::Completion, Result<(), flowfarm_store::StoreError>> {
    Grouper::new(MAX_GROUP, move |requests: Vec<flowfarm_store::Completion>| {
        let store = store.clone();
        async move {
            let done = match store.complete_jobs(&requests).await {
                Ok(done) => done,
                Err(e) => {
                    tracing::warn!(error = %e, "grouped CompleteJob failed; taking the calls one by one");
                    vec![false; requests.len()]
                }
            };
            let mut out = Vec::with_capacity(requests.len());
            for (c, done) in requests.into_iter().zip(done) {
                // Not done by the group: a repeat (no-op) or a refusal, said by the single path.
                out.push(if done { Ok(()) } else { store.complete_job(c.job_id, c.attempt, c.worker_id, &c.result, c.gpu_seconds).await });
            }
            out
        }
    })
    .in_flight(GROUPS_IN_FLIGHT)
}

/// Handle to a coordinator's services; cheap to clone.
#[derive(Debug, Clone)]
pub struct Coordinator {
    shared: Arc<Shared>,
}

impl Coordinator {
    /// Builds the services over `store` (any [`Store`]: Postgres across
    /// machines) with `config`'s registry, limits, leases and retry backoff.
    ///
    /// # Errors
    /// [`ConfigError`] if the config does not pass its checks or the results
    /// store cannot be opened.
    pub fn new(config: &Config, store: impl Store) -> Result<Self, ConfigError> {
        config.check()?;
        let results = flowfarm_results::ResultStore::open(config.results.url.as_deref(), &config.results.dir)
            .map_err(|e| ConfigError::Invalid(format!("results: {e}")))?;
        let tls = config.server.tls.as_ref().map(tls::ServerTls::load).transpose().map_err(|e| ConfigError::Invalid(e.to_string()))?;
        let (progress, _) = broadcast::channel(4096);
        let store: Arc<dyn Store> = Arc::new(store.with_retry_backoff(config.retries.backoff()));
        Ok(Coordinator {
            shared: Arc::new(Shared {
                queue: config.queue.clone(),
                metrics: Metrics::new(),
                dispatch_wake: Arc::new(Notify::new()),
                starts: start_grouper(store.clone(), config.leases.lease()),
                completions: completion_grouper(store.clone()),
                worker_tokens: Default::default(),
                auth: Authenticator::new(store.clone()),
                registry: config.registry()?,
                limits: config.limits.clone(),
                leases: config.leases.clone(),
                results,
                results_sweep_interval: std::time::Duration::from_secs_f64(config.results.sweep_interval_seconds),
                shutdown_grace: config.server.shutdown_grace(),
                store,
                progress,
                tls,
                not_ready: std::sync::Mutex::new(None),
                tasks: tokio_util::task::TaskTracker::new(),
            }),
        })
    }

    /// The metrics this coordinator updates.
    pub fn metrics(&self) -> &Metrics {
        &self.shared.metrics
    }

    /// Why the coordinator cannot work now (Postgres or Redis does not
    /// answer), as its health checks last found; None while it can.
    pub fn not_ready(&self) -> Option<String> {
        self.shared.not_ready.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn set_not_ready(&self, problem: Option<String>) {
        *self.shared.not_ready.lock().unwrap_or_else(|p| p.into_inner()) = problem;
    }

    /// The server's TLS, to reload it (SIGHUP does so too).
    pub fn tls(&self) -> Option<&Arc<tls::ServerTls>> {
        self.shared.tls.as_ref()
    }

    /// Authenticates a WorkerService call: a worker token, and with
    /// `require_worker_certificates` a client certificate naming it.
    async fn authorize_worker<T>(&self, request: &tonic::Request<T>) -> Result<auth::Caller, tonic::Status> {
        let caller = self.shared.auth.authorize(request.metadata(), &[flowfarm_core::Role::Worker]).await?;
        if self.shared.tls.as_ref().is_some_and(|t| t.requires_worker_certificates()) {
            let certs = request.peer_certs();
            tls::check_worker_certificate(certs.as_deref().map(Vec::as_slice), &caller.name)?;
        }
        Ok(caller)
    }

    /// Asks the dispatcher (if one runs) for a pass now.
    fn wake_dispatcher(&self) {
        self.shared.dispatch_wake.notify_one();
    }
}
