//! `flowfarm dev`: a whole farm in one process, for one machine.
//!
//! The coordinator (the same gRPC API, status page and dispatcher as in
//! production) over the SQLite store in `--data`, the in-process queue in
//! place of Redis, and N CPU workers rendering the bundled model. Nothing
//! else needs to run: no Postgres, no Redis. State lives in `--data` (the
//! database, the results, the tokens) and survives a restart.
//!
//! Shutdown goes in order: the workers first (they drain and deregister,
//! which needs the coordinator), then the coordinator and its tasks.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use flowfarm_coordinator::tokens::{ensure_first_admin_token, write_owner_only, FirstAdmin};
use flowfarm_coordinator::{Config, Coordinator};
use flowfarm_core::Role;
use flowfarm_proto::v1 as pb;
use flowfarm_queue::{JobSource, MemoryQueue};
use flowfarm_store::{NewToken, SqliteStore, Store};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// The bundled model the workers render, as the example config names it.
const DEMO_MODEL: &str = "flowfarm-tiny";

/// Replays of `--demo` find the first demo batch instead of making another.
const DEMO_KEY: &str = "flowfarm-dev-demo";

const DEMO_PROMPTS: [&str; 4] =
    ["a lighthouse on a cliff at dusk", "a red fox in fresh snow", "a bowl of lemons on a blue table", "a paper boat on a pond"];
const DEMO_SEEDS: u64 = 4;

#[derive(clap::Args)]
pub struct DevArgs {
    /// Where the farm keeps its state: the SQLite database (farm.db), the
    /// rendered images (results/) and the tokens. Made if missing; one
    /// `flowfarm dev` at a time per folder.
    #[arg(long, default_value = "flowfarm-dev")]
    data: PathBuf,
    /// The gRPC address farmctl and clients use (farmctl's default server).
    #[arg(long, default_value = "127.0.0.1:7070")]
    listen: SocketAddr,
    /// Where the status page is served.
    #[arg(long, default_value = "127.0.0.1:8080")]
    status_listen: SocketAddr,
    /// CPU workers rendering in this process.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(0..=64))]
    workers: u32,
    /// The weights the workers serve as `flowfarm-tiny` (a diffusers folder).
    #[arg(long, default_value = "models/flowfarm-tiny")]
    model: PathBuf,
    /// Submit a small demo grid at start, show its progress and say where to look.
    #[arg(long)]
    demo: bool,
}

/// Holds the data folder's lock for as long as the farm runs.
struct DataLock(#[allow(dead_code)] std::fs::File);

fn lock_data(dir: &Path) -> Result<DataLock> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot make the data folder {} (--data)", dir.display()))?;
    let path = dir.join("lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => Ok(DataLock(file)),
        Err(std::fs::TryLockError::WouldBlock) => {
            bail!("another `flowfarm dev` is using {}; stop it, or pass another --data folder", dir.display())
        }
        Err(std::fs::TryLockError::Error(e)) => Err(e).with_context(|| format!("locking {}", path.display())),
    }
}

/// The workers' token, kept in `dir/worker.token` and made again only when
/// the one there no longer works.
async fn worker_token(store: &SqliteStore, dir: &Path) -> Result<String> {
    let path = dir.join("worker.token");
    if let Ok(secret) = std::fs::read_to_string(&path) {
        if let Some(token) = store.authenticate(secret.trim()).await? {
            if token.role == Role::Worker {
                return Ok(secret.trim().to_owned());
            }
        }
    }
    let (_, secret) = store.create_token(&NewToken::new("dev-workers", Role::Worker), rand::random()).await?;
    write_owner_only(&path, &secret).with_context(|| format!("writing the workers' token to {}", path.display()))?;
    Ok(secret)
}

fn worker_config(name: String, url: &str, token: &str, results: &Path, model: &Path) -> flowfarm_worker::WorkerConfig {
    flowfarm_worker::WorkerConfig {
        name: Some(name),
        coordinator: url.to_owned(),
        token: token.to_owned(),
        results_dir: results.to_owned(),
        capacity: 1,
        drain_timeout_seconds: 30.0,
        models: vec![flowfarm_worker::ModelEntry { name: DEMO_MODEL.into(), path: model.to_owned(), ..Default::default() }],
        ..Default::default()
    }
}

/// Runs the farm until SIGTERM or Ctrl-C, then stops it in order.
pub async fn run(args: DevArgs, mut config: Config) -> Result<()> {
    let _lock = lock_data(&args.data)?;
    let data = std::fs::canonicalize(&args.data).with_context(|| format!("resolving {}", args.data.display()))?;
    if args.workers > 0 && !args.model.join("model_index.json").is_file() {
        bail!(
            "no model at {} (--model): run from the repository's root, where models/flowfarm-tiny is, or pass --model",
            args.model.display()
        );
    }
    config.server.listen = args.listen;
    config.status.listen = Some(args.status_listen);
    config.metrics.listen = None;
    config.results.dir = data.join("results");
    config.results.url = None;
    config.queue.in_process = true;
    config.auth.admin_token_file = data.join("admin.token");
    config.check_exposure()?;

    let store = SqliteStore::open(&data.join("farm.db")).await.with_context(|| format!("opening {}", data.join("farm.db").display()))?;
    if let FirstAdmin::Written(path) = ensure_first_admin_token(&store, &config.auth.admin_token_file).await? {
        eprintln!("made an admin token; its secret is in {} (readable by you only)", path.display());
    }
    let admin = std::fs::read_to_string(&config.auth.admin_token_file).map(|s| s.trim().to_owned()).with_context(|| {
        format!("reading the admin token {} (delete {} to start a fresh farm)", config.auth.admin_token_file.display(), data.display())
    })?;
    let coordinator = Coordinator::new(&config, store.clone())?;
    let listener = tokio::net::TcpListener::bind(config.server.listen)
        .await
        .with_context(|| format!("cannot listen on {} (--listen); is another farm running there?", config.server.listen))?;
    let addr = listener.local_addr()?;
    let status_listener = flowfarm_coordinator::bind_status_page(args.status_listen)
        .await
        .with_context(|| format!("cannot serve the status page on {} (--status-listen)", args.status_listen))?;
    let status_url = format!("http://{}", status_listener.local_addr()?);

    let (stop_coordinator, stop_workers) = (CancellationToken::new(), CancellationToken::new());
    let (tasks, workers) = (TaskTracker::new(), TaskTracker::new());
    let queue = MemoryQueue::new();
    tasks.spawn(flowfarm_coordinator::Dispatcher::new(coordinator.clone(), Arc::new(queue.clone())).run(stop_coordinator.clone()));
    tasks.spawn(flowfarm_coordinator::serve_status_page(coordinator.clone(), status_listener, stop_coordinator.clone()));
    let failure = Failure { first: Arc::default(), stop: stop_workers.clone() };
    let (serving, server_failure) = (stop_coordinator.clone(), failure.clone());
    let server = tasks.spawn(async move {
        let served = flowfarm_coordinator::serve(coordinator, listener, serving.clone()).await;
        if !serving.is_cancelled() {
            server_failure.record(match &served {
                Ok(()) => "the gRPC server stopped without being asked to".to_owned(),
                Err(e) => format!("the gRPC server failed: {e}"),
            });
        }
    });

    let url = format!("http://{addr}");
    let token = worker_token(&store, &data).await?;
    for i in 1..=args.workers {
        let config = worker_config(format!("dev-{i}"), &url, &token, &data.join("results"), &args.model);
        let queue = queue.clone();
        let source = flowfarm_worker::WorkSource::Given(Box::new(move |_, lanes| Arc::new(queue.consumer(lanes)) as Arc<dyn JobSource>));
        let (stop, failure) = (stop_workers.clone(), failure.clone());
        workers.spawn(async move {
            // A worker drained by an operator ends cleanly and the farm goes
            // on; one that fails before the farm stops stops the farm.
            if let Err(e) = flowfarm_worker::run_with(config, source, stop.clone()).await {
                if stop.is_cancelled() {
                    tracing::error!(error = %e, worker = i, "a dev worker did not drain cleanly");
                } else {
                    failure.record(format!("worker dev-{i} stopped: {e}"));
                }
            }
        });
    }
    workers.close();

    println!("flowfarm dev: a farm in one process; its state is in {}", data.display());
    println!("  {} CPU worker(s) rendering {DEMO_MODEL}; no Postgres or Redis needed", args.workers);
    println!("  admin token: {} (farmctl reads FLOWFARM_TOKEN)", config.auth.admin_token_file.display());
    println!("  try: FLOWFARM_TOKEN=$(cat {}) farmctl --server {url} jobs list", config.auth.admin_token_file.display());
    println!("status page on {status_url}");
    println!("  sign in: {status_url}/login#token={admin}");
    // Scripts and tests read this line to find the (maybe ephemeral) port.
    println!("listening on {addr}");

    let demo = if args.demo {
        let demo = tokio::spawn(run_demo(url.clone(), admin.clone(), status_url.clone(), data.clone(), stop_coordinator.clone()));
        Some(demo)
    } else {
        None
    };

    super::cancel_on_signal(stop_workers.clone()).await;
    if let Some(demo) = demo {
        demo.abort();
    }
    // A second Ctrl-C does not wait for the drain. SQLite commits are
    // atomic, so the state is whole either way; leases of jobs cut short
    // expire and the jobs run again at the next start.
    tokio::spawn(async {
        if tokio::signal::ctrl_c().await.is_ok() {
            eprintln!("second Ctrl-C: exiting without waiting for the workers");
            std::process::exit(130);
        }
    });
    // The workers first: they hand back what they hold and deregister
    // (which needs the server; without it there is nothing to wait for).
    if !server.is_finished() {
        if failure.first().is_none() {
            eprintln!("stopping: the workers finish or hand back their jobs (Ctrl-C again to exit now)");
        }
        if tokio::time::timeout(Duration::from_secs(60), workers.wait()).await.is_err() {
            tracing::warn!("workers still draining after 60 s; stopping anyway");
        }
    }
    stop_coordinator.cancel();
    tasks.close();
    if tokio::time::timeout(config.server.shutdown_grace(), tasks.wait()).await.is_err() {
        tracing::warn!(left = tasks.len(), "tasks still running after the grace period; exiting anyway");
    }
    if let Some(what) = failure.first() {
        bail!("{what}; the farm's state stays in {}", data.display());
    }
    println!("stopped; the farm's state stays in {}", data.display());
    Ok(())
}

/// The first thing that stopped the farm without being asked to; recording
/// it stops the farm.
#[derive(Clone)]
struct Failure {
    first: Arc<std::sync::Mutex<Option<String>>>,
    stop: CancellationToken,
}

impl Failure {
    fn record(&self, what: String) {
        tracing::error!(%what, "stopping the farm");
        self.first.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert(what);
        self.stop.cancel();
    }

    fn first(&self) -> Option<String> {
        self.first.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// Submits the demo grid (once per data folder: a replay returns the first
/// one), prints its progress until it is done, then where to look.
async fn run_demo(url: String, admin: String, status_url: String, data: PathBuf, stop: CancellationToken) {
    if let Err(e) = demo(&url, &admin, &status_url, &data, &stop).await {
        eprintln!("demo: {e:#}");
    }
}

async fn demo(url: &str, admin: &str, status_url: &str, data: &Path, stop: &CancellationToken) -> Result<()> {
    let channel = tonic::transport::Endpoint::from_shared(url.to_owned())?.connect().await?;
    let auth = flowfarm_proto::client::BearerToken::new(admin)?;
    let mut render = pb::render_service_client::RenderServiceClient::with_interceptor(channel, auth);
    let jobs = DEMO_PROMPTS
        .iter()
        .flat_map(|prompt| {
            (0..DEMO_SEEDS).map(move |seed| pb::JobSpec {
                model: DEMO_MODEL.into(),
                prompt: (*prompt).into(),
                seed: Some(seed),
                ..Default::default()
            })
        })
        .collect();
    let request = pb::SubmitBatchRequest {
        idempotency_key: DEMO_KEY.into(),
        labels: [("demo".to_owned(), "true".to_owned())].into(),
        jobs,
        ..Default::default()
    };
    let submitted = render.submit_batch(request).await.context("submitting the demo grid")?.into_inner();
    let batch = submitted.batch.context("the coordinator returned no batch")?;
    let verb = if submitted.created { "submitted" } else { "found (submitted at an earlier start)" };
    println!("demo: {verb} batch {} ({} jobs: {} prompts × {DEMO_SEEDS} seeds)", batch.id, batch.total_jobs, DEMO_PROMPTS.len());
    let mut shown = u64::MAX;
    loop {
        let counts = render.get_batch(pb::GetBatchRequest { batch_id: batch.id.clone() }).await?.into_inner().counts.unwrap_or_default();
        let finished = counts.succeeded + counts.failed + counts.cancelled + counts.dead;
        if finished != shown {
            println!("demo: {finished}/{} finished ({} rendering)", batch.total_jobs, counts.running);
            shown = finished;
        }
        if finished >= batch.total_jobs {
            break;
        }
        tokio::select! {
            () = stop.cancelled() => return Ok(()),
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
    }
    println!("demo: done. Look at the contact sheet: {status_url}/batches/{}", batch.id);
    println!("demo: the images are under {}; or fetch them with a contact sheet:", data.join("results").display());
    println!(
        "demo:   FLOWFARM_TOKEN=$(cat {}) farmctl --server {url} results fetch {} --contact-sheet --out demo",
        data.join("admin.token").display(),
        batch.id
    );
    Ok(())
}
