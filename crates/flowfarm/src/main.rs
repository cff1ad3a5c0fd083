//! `flowfarm`: the farm's server binary.
//!
//! - `flowfarm dev`: a whole farm in one process on SQLite, no Postgres or
//!   Redis (`dev.rs`).
//! - `flowfarm coordinator`: migrate, then serve the gRPC API, dispatch into
//!   Redis, reap expired leases, serve /metrics.
//! - `flowfarm worker`: the worker daemon (its own config, `config/worker.toml`).
//! - `flowfarm migrate`: apply database migrations and exit.
//! - `flowfarm token create|list|revoke`: manage API tokens.
//! - `flowfarm config print [--worker]`: the effective configuration, secrets masked.
//! - `flowfarm model inspect|verify|render|convert`: local work with a model,
//!   in any form its weights are published in.

mod dev;
mod model;
mod plan;
mod score;
mod telemetry;
mod train;

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use flowfarm_coordinator::{Config, Coordinator};
use flowfarm_core::Role;
use flowfarm_store::PgStore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

// glibc's malloc hands large freed buffers back to the OS and page-faults the
// next ones in: with tensors of megabytes allocated every layer, that was about
// a third of a CPU render step.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc's `mi_option_purge_delay` (its index in mimalloc.h's `mi_option_e`, the same in v2 and v3).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Keeps freed pages committed instead of returning them to the OS 10 ms
/// after the free (mimalloc's default): a render allocates the same few
/// activation sizes every block and step, and faulting them back in (each a
/// zeroed 2 MiB huge page) cost 15 % of a CPU step. The process's resident
/// size stays at its peak, which a render worker reaches on every step anyway.
fn keep_freed_memory() {
    // SAFETY: setting an option is thread-safe and takes effect on the next purge.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
}

#[derive(Parser)]
#[command(name = "flowfarm", version, about = "flowfarm render farm: coordinator, migrations, tokens")]
struct Cli {
    /// Coordinator config file (TOML).
    #[arg(long, global = true, env = "FLOWFARM_CONFIG", default_value = "config/flowfarm.toml")]
    config: PathBuf,
    /// Log format: human-readable text, or one JSON object per line.
    #[arg(long, global = true, env = "FLOWFARM_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run a whole farm in this process: coordinator, status page and CPU
    /// workers over SQLite in --data, no Postgres or Redis; Ctrl-C stops it,
    /// and its state survives a restart.
    Dev(dev::DevArgs),
    /// Run the coordinator: apply migrations, serve gRPC, dispatch, reap expired leases.
    Coordinator,
    /// Run a worker daemon: render jobs of the models in its config until
    /// drained (SIGTERM drains with a deadline; exit 0 once drained).
    Worker {
        /// Worker config file (TOML); `--config` is the coordinator's.
        #[arg(long, env = "FLOWFARM_WORKER_CONFIG", default_value = "config/worker.toml")]
        worker_config: PathBuf,
    },
    /// Apply database migrations and exit (creates the database if missing).
    Migrate,
    /// Manage API tokens.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Show the effective configuration.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Inspect a model or render with it locally (no farm needed).
    Model {
        #[command(subcommand)]
        command: model::ModelCommand,
    },
    /// Train a model that draws procedural scenes from their captions: an
    /// autoencoder, then the MM-DiT on its latents, written as a model
    /// folder every command loads (the paper's recipe; --resume continues).
    Train(Box<train::TrainArgs>),
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Print the configuration as it takes effect (the file, then the
    /// environment), as TOML with secrets masked.
    Print {
        /// The worker's configuration (`--worker-config`) instead of the coordinator's.
        #[arg(long)]
        worker: bool,
        /// Worker config file (TOML).
        #[arg(long, env = "FLOWFARM_WORKER_CONFIG", default_value = "config/worker.toml")]
        worker_config: PathBuf,
    },
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Create a token and print its secret (shown once).
    Create {
        /// What the token may do.
        #[arg(long, value_enum)]
        role: RoleArg,
        /// Who holds it: its tenant, recorded as the submitter of its batches
        /// (tokens with the same name see the same batches). Quotas and
        /// expiry: `farmctl tokens create`.
        #[arg(long)]
        name: Option<String>,
    },
    /// List live tokens (without secrets).
    List,
    /// Revoke a token by id.
    Revoke { id: uuid::Uuid },
}

#[derive(Clone, Copy, ValueEnum)]
enum RoleArg {
    Submit,
    Admin,
    Worker,
}

impl From<RoleArg> for Role {
    fn from(role: RoleArg) -> Role {
        match role {
            RoleArg::Submit => Role::Submit,
            RoleArg::Admin => Role::Admin,
            RoleArg::Worker => Role::Worker,
        }
    }
}

/// Connects to the configured database, creating it and migrating it first.
async fn open_store(config: &Config) -> Result<PgStore> {
    let url = &config.database.url;
    PgStore::create_database_if_missing(url).await.with_context(|| {
        format!("cannot reach Postgres at {} (is it running? set FLOWFARM_DATABASE_URL)", flowfarm_config::mask_url(url))
    })?;
    let store = PgStore::connect(url, config.database.max_connections)
        .await
        .with_context(|| format!("cannot connect to {}", flowfarm_config::mask_url(url)))?;
    store.migrate().await.context("applying migrations")?;
    Ok(store)
}

/// Cancels `shutdown` at the first SIGTERM or Ctrl-C; returns early when
/// something else cancels it.
async fn cancel_on_signal(shutdown: CancellationToken) {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
        () = shutdown.cancelled() => return,
    }
    tracing::info!("shutting down");
    shutdown.cancel();
}

/// Connects to Redis (retrying with backoff while it is away), then runs the
/// dispatcher until `shutdown` is cancelled.
async fn run_dispatcher(coordinator: Coordinator, redis: flowfarm_queue::RedisTarget, shutdown: CancellationToken) {
    let mut pause = std::time::Duration::from_millis(200);
    let queue = loop {
        match flowfarm_queue::WorkQueue::connect(redis.clone()).await {
            Ok(queue) => break queue,
            Err(e) => {
                tracing::warn!(error = %e, "cannot reach Redis (queue.redis_url / FLOWFARM_REDIS_URL); retrying");
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(pause) => {}
                }
                pause = (pause * 2).min(std::time::Duration::from_secs(5));
            }
        }
    };
    flowfarm_coordinator::Dispatcher::new(coordinator, std::sync::Arc::new(queue)).run(shutdown).await;
}

#[tokio::main]
async fn main() -> Result<()> {
    keep_freed_memory();
    let cli = Cli::parse();
    match cli.command {
        Command::Model { command } => {
            telemetry::init(cli.log_format, &Default::default(), "flowfarm", telemetry::SERVICE_LOGS)?;
            model::run(command)
        }
        Command::Train(args) => {
            telemetry::init(cli.log_format, &Default::default(), "flowfarm", telemetry::SERVICE_LOGS)?;
            train::run(*args)
        }
        Command::Config { command: ConfigCommand::Print { worker: true, worker_config } } => {
            print!("{}", load_worker_config(&worker_config)?.to_masked_toml()?);
            Ok(())
        }
        Command::Worker { worker_config } => {
            // A worker has nothing to reload; a reload sent to a whole host
            // must not stop its renders.
            survive_sighup()?;
            let config = load_worker_config(&worker_config)?;
            let telemetry = telemetry::init(cli.log_format, &config.tracing, "flowfarm-worker", telemetry::SERVICE_LOGS)?;
            let shutdown = CancellationToken::new();
            let signals = tokio::spawn(cancel_on_signal(shutdown.clone()));
            let ran = flowfarm_worker::run(config, shutdown.clone()).await;
            shutdown.cancel();
            let _ = signals.await;
            let _ = tokio::task::spawn_blocking(move || telemetry.shutdown()).await;
            Ok(ran?)
        }
        Command::Dev(args) => {
            survive_sighup()?;
            let config = Config::load(&cli.config).with_context(|| {
                "loading config (run from the repository's root, where config/flowfarm.toml is, or pass --config FILE)".to_string()
            })?;
            let telemetry = telemetry::init(cli.log_format, &config.tracing, "flowfarm-dev", telemetry::QUIET_LOGS)?;
            let ran = dev::run(args, config).await;
            let _ = tokio::task::spawn_blocking(move || telemetry.shutdown()).await;
            ran
        }
        command => {
            let config = Config::load(&cli.config).with_context(|| {
                "loading config (pass --config FILE or set FLOWFARM_CONFIG; config/flowfarm.toml is an example)".to_string()
            })?;
            let telemetry = telemetry::init(cli.log_format, &config.tracing, "flowfarm-coordinator", telemetry::SERVICE_LOGS)?;
            let ran = run(command, config).await;
            let _ = tokio::task::spawn_blocking(move || telemetry.shutdown()).await;
            ran
        }
    }
}

/// Replaces SIGHUP's default action (exit) for the rest of the process's
/// life: tokio's handler, once installed, stays; the services that reload on
/// the signal listen for it themselves.
fn survive_sighup() -> Result<()> {
    #[cfg(unix)]
    drop(tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).context("installing the SIGHUP handler")?);
    Ok(())
}

fn load_worker_config(path: &std::path::Path) -> Result<flowfarm_worker::WorkerConfig> {
    flowfarm_worker::WorkerConfig::load(path)
        .with_context(|| format!("loading worker config {} (--worker-config / FLOWFARM_WORKER_CONFIG)", path.display()))
}

/// The commands that run on the coordinator's config.
async fn run(command: Command, config: Config) -> Result<()> {
    match command {
        Command::Coordinator => {
            config.check_exposure()?;
            // SIGHUP reloads TLS files (tls::reload_on_sighup), and must not
            // stop the coordinator even before the server runs.
            survive_sighup()?;
            let store = open_store(&config).await?;
            if !config.auth.admin_token_file.as_os_str().is_empty() {
                use flowfarm_coordinator::tokens::{ensure_first_admin_token, FirstAdmin};
                if let FirstAdmin::Written(path) = ensure_first_admin_token(&store, &config.auth.admin_token_file).await? {
                    // On stderr: stdout's last line is the listen address scripts read.
                    eprintln!("no admin token existed: made one, its secret is in {} (readable by you only)", path.display());
                }
            }
            let coordinator = Coordinator::new(&config, store)?;
            let listener = tokio::net::TcpListener::bind(config.server.listen)
                .await
                .with_context(|| format!("cannot listen on {} (server.listen / FLOWFARM_LISTEN)", config.server.listen))?;
            let addr = listener.local_addr()?;
            // One token stops everything; the tracker holds every task this
            // command spawns, and the command returns once they have ended.
            let shutdown = CancellationToken::new();
            let tasks = TaskTracker::new();
            tasks.spawn(cancel_on_signal(shutdown.clone()));
            if let Some(metrics_addr) = config.metrics.listen {
                let metrics_listener = flowfarm_coordinator::bind_metrics(metrics_addr).await?;
                println!("metrics on {}", metrics_listener.local_addr()?);
                tasks.spawn(flowfarm_coordinator::serve_metrics(coordinator.clone(), metrics_listener, shutdown.clone()));
            }
            if let Some(status_addr) = config.status.listen {
                let status_listener = flowfarm_coordinator::bind_status_page(status_addr).await?;
                let scheme = if config.server.tls.is_some() { "https" } else { "http" };
                println!("status page on {scheme}://{}", status_listener.local_addr()?);
                tasks.spawn(flowfarm_coordinator::serve_status_page(coordinator.clone(), status_listener, shutdown.clone()));
            }
            tracing::info!(%addr, "coordinator listening");
            // Tests and scripts read this line (the last one on stdout) to find an ephemeral port.
            println!("listening on {addr}");
            tasks.spawn(run_dispatcher(coordinator.clone(), config.queue.redis_target(), shutdown.clone()));
            let served = flowfarm_coordinator::serve(coordinator, listener, shutdown.clone()).await;
            // A server that stops by itself has failed: stop the rest and exit non-zero.
            let asked = shutdown.is_cancelled();
            shutdown.cancel();
            tasks.close();
            // The HTTP servers wait for their connections: a client that
            // never finishes a request must not keep the process alive.
            if tokio::time::timeout(config.server.shutdown_grace(), tasks.wait()).await.is_err() {
                tracing::warn!(left = tasks.len(), "tasks still running after the grace period; exiting anyway");
            }
            served?;
            if !asked {
                bail!("the gRPC server stopped without being asked to");
            }
        }
        Command::Migrate => {
            open_store(&config).await?;
            println!("migrations applied to {}", flowfarm_config::mask_url(&config.database.url));
        }
        Command::Token { command } => {
            let store = open_store(&config).await?;
            match command {
                TokenCommand::Create { role, name } => {
                    let role = Role::from(role);
                    let name = name.unwrap_or_else(|| role.as_str().to_owned());
                    if let Err(e) = flowfarm_store::check_token_name(&name) {
                        bail!("--name {e}");
                    }
                    let (_, secret) = store.create_token(&flowfarm_store::NewToken::new(name, role), rand::random()).await?;
                    println!("{secret}");
                }
                TokenCommand::List => {
                    for token in store.list_tokens(false).await? {
                        println!("{}\t{}\t{}", token.id, token.role.as_str(), token.name);
                    }
                }
                TokenCommand::Revoke { id } => {
                    store.revoke_token(id).await?;
                    println!("revoked {id}");
                }
            }
        }
        Command::Config { command: ConfigCommand::Print { .. } } => print!("{}", config.to_masked_toml()?),
        Command::Model { .. } | Command::Train(_) | Command::Worker { .. } | Command::Dev(_) => unreachable!("handled by main"),
    }
    Ok(())
}
