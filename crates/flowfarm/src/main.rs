//! `flowfarm`: the farm's server binary.
//!
//! - `flowfarm coordinator`: migrate, then serve the gRPC API and run the reaper.
//! - `flowfarm migrate`: apply database migrations and exit.
//! - `flowfarm token create|list|revoke`: manage API tokens.
//! - `flowfarm model inspect|render`: local work with a model folder.

mod model;

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use flowfarm_coordinator::{Config, Coordinator};
use flowfarm_core::Role;
use flowfarm_store::PgStore;
use tracing_subscriber::EnvFilter;

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
    /// Run the coordinator: apply migrations, serve gRPC, reap expired leases.
    Coordinator,
    /// Apply database migrations and exit (creates the database if missing).
    Migrate,
    /// Manage API tokens.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Inspect a model or render with it locally (no farm needed).
    Model {
        #[command(subcommand)]
        command: model::ModelCommand,
    },
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Create a token and print its secret (shown once).
    Create {
        /// What the token may do.
        #[arg(long, value_enum)]
        role: RoleArg,
        /// Who holds it; recorded as the submitter of its batches.
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

fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,sqlx=warn"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Connects to the configured database, creating it and migrating it first.
async fn open_store(config: &Config) -> Result<PgStore> {
    let url = &config.database.url;
    PgStore::create_database_if_missing(url)
        .await
        .with_context(|| format!("cannot reach Postgres at {} (is it running? set FLOWFARM_DATABASE_URL)", redact(url)))?;
    let store = PgStore::connect(url, config.database.max_connections)
        .await
        .with_context(|| format!("cannot connect to {}", redact(url)))?;
    store.migrate().await.context("applying migrations")?;
    Ok(store)
}

/// The URL without its password, for messages.
fn redact(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut parsed) if parsed.password().is_some() => {
            let _ = parsed.set_password(Some("***"));
            parsed.to_string()
        }
        _ => url.to_owned(),
    }
}

async fn shutdown_signal() {
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
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
    tracing::info!("shutting down");
}

#[tokio::main]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    if let Command::Model { command } = cli.command {
        return model::run(command);
    }
    let config = Config::load(&cli.config).with_context(|| {
        "loading config (pass --config FILE or set FLOWFARM_CONFIG; config/flowfarm.toml is an example)".to_string()
    })?;
    match cli.command {
        Command::Coordinator => {
            let store = open_store(&config).await?;
            let coordinator = Coordinator::new(&config, store)?;
            let listener = tokio::net::TcpListener::bind(config.server.listen)
                .await
                .with_context(|| format!("cannot listen on {} (server.listen / FLOWFARM_LISTEN)", config.server.listen))?;
            let addr = listener.local_addr()?;
            tracing::info!(%addr, "coordinator listening");
            // Tests and scripts read this line to find an ephemeral port.
            println!("listening on {addr}");
            flowfarm_coordinator::serve(coordinator, listener, shutdown_signal()).await?;
        }
        Command::Migrate => {
            open_store(&config).await?;
            println!("migrations applied to {}", redact(&config.database.url));
        }
        Command::Token { command } => {
            let store = open_store(&config).await?;
            match command {
                TokenCommand::Create { role, name } => {
                    let role = Role::from(role);
                    let name = name.unwrap_or_else(|| role.as_str().to_owned());
                    if name.trim().is_empty() {
                        bail!("--name must not be empty");
                    }
                    let (_, secret) = store.create_token(&name, role, rand::random()).await?;
                    println!("{secret}");
                }
                TokenCommand::List => {
                    for token in store.list_tokens().await? {
                        println!("{}\t{}\t{}", token.id, token.role.as_str(), token.name);
                    }
                }
                TokenCommand::Revoke { id } => {
                    store.revoke_token(id).await?;
                    println!("revoked {id}");
                }
            }
        }
        Command::Model { .. } => unreachable!("handled before the config is loaded"),
    }
    Ok(())
}
