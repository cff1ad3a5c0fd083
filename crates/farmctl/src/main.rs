//! `farmctl`: submit and watch batches, run the queue, watch the fleet.
//!
//! Exit status: 0 on success, 1 on any error (the message says what to do),
//! 2 on a usage error, 3 when `watch` ends with jobs that did not succeed.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{CommandFactory, Parser, Subcommand};
use flowfarm_proto::v1 as pb;
use serde_json::json;

use farmctl::client::Farm;
use farmctl::{input, output};

mod commands;

use commands::jobs::{jobs, JobsCommand};
use commands::results::{fetch_results, ResultsCommand};
use commands::top::top;
use commands::watch::watch;

#[derive(Parser)]
#[command(name = "farmctl", version, about = "Submit, watch and operate flowfarm render batches")]
struct Cli {
    /// Coordinator address: http://host:port, or https://host:port for TLS.
    #[arg(long, global = true, env = "FLOWFARM_SERVER", default_value = "http://127.0.0.1:7070")]
    server: String,
    /// API token (`flowfarm token create --role submit|admin`).
    #[arg(long, global = true, env = "FLOWFARM_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Print JSON instead of text.
    #[arg(long, global = true)]
    json: bool,
    /// PEM CA certificate(s) to trust for an https:// server instead of the system's.
    #[arg(long, global = true, env = "FLOWFARM_CA")]
    ca: Option<PathBuf>,
    /// PEM client certificate, for coordinators that ask for one (with --key).
    #[arg(long, global = true, env = "FLOWFARM_CLIENT_CERT")]
    cert: Option<PathBuf>,
    /// PEM key of the client certificate.
    #[arg(long, global = true, env = "FLOWFARM_CLIENT_KEY")]
    key: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Submit a batch: FILE is .jsonl (one job spec per line) or .toml (a grid).
    Submit {
        file: PathBuf,
        /// Makes retries of this submission safe: the same key and content return the first batch.
        #[arg(long)]
        idempotency_key: Option<String>,
        /// Batch label `key=value`; repeatable.
        #[arg(long = "label", value_parser = parse_label)]
        labels: Vec<(String, String)>,
        /// Watch the batch after submitting it.
        #[arg(long)]
        watch: bool,
    },
    /// Follow a batch until every job has finished; exits 3 if any did not succeed.
    Watch { batch: String },
    /// Show a batch and its job counts.
    Batch { batch: String },
    /// Query and change jobs.
    Jobs {
        #[command(subcommand)]
        command: JobsCommand,
    },
    /// Pause, resume and inspect the queue.
    Queue {
        #[command(subcommand)]
        command: QueueCommand,
    },
    /// Inspect and steer workers.
    Workers {
        #[command(subcommand)]
        command: WorkersCommand,
    },
    /// Live view of the farm: queue depth per state, throughput, workers (admin).
    Top {
        /// Seconds between refreshes.
        #[arg(long, default_value_t = 2.0)]
        interval: f64,
        /// Print one frame and exit (with --json: one JSON object).
        #[arg(long)]
        once: bool,
    },
    /// Make, list and revoke API tokens (admin).
    Tokens {
        #[command(subcommand)]
        command: farmctl::tokens::TokensCommand,
    },
    /// Download rendered images.
    Results {
        #[command(subcommand)]
        command: ResultsCommand,
    },
    /// Print a shell completion script.
    Completions { shell: clap_complete::Shell },
}

#[derive(Subcommand)]
enum QueueCommand {
    /// Stop dispatching (every model, or one).
    Pause {
        #[arg(long)]
        model: Option<String>,
        #[arg(long)]
        reason: Option<String>,
    },
    /// Resume dispatching.
    Resume {
        #[arg(long)]
        model: Option<String>,
    },
    /// Job counts per model and state.
    Stats {
        #[arg(long)]
        model: Option<String>,
    },
}

#[derive(Subcommand)]
enum WorkersCommand {
    /// List workers.
    List {
        /// Include workers that have gone.
        #[arg(long)]
        all: bool,
    },
    /// Let a worker finish its jobs, take no more, and exit.
    Drain { worker: String },
    /// Keep a worker up but give it no new jobs.
    Cordon { worker: String },
    /// Give a cordoned worker jobs again.
    Uncordon { worker: String },
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    s.split_once('=').map(|(k, v)| (k.to_owned(), v.to_owned())).ok_or_else(|| format!("`{s}` is not key=value"))
}

/// Prints `value` as JSON when asked, else the text.
pub(crate) fn emit(json: bool, value: serde_json::Value, text: impl FnOnce() -> String) {
    if json {
        println!("{value}");
    } else {
        println!("{}", text());
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::from(1)
        }
    }
}

async fn run(cli: Cli) -> Result<ExitCode> {
    if let Command::Completions { shell } = cli.command {
        clap_complete::generate(shell, &mut Cli::command(), "farmctl", &mut std::io::stdout());
        return Ok(ExitCode::SUCCESS);
    }
    let tls =
        flowfarm_proto::client::ClientTls { ca_file: cli.ca.clone(), cert_file: cli.cert.clone(), key_file: cli.key.clone(), domain: None };
    let farm = Farm::connect(&cli.server, cli.token.as_deref(), &tls).await?;
    let json = cli.json;
    match cli.command {
        Command::Completions { .. } => unreachable!("handled above"),
        Command::Submit { file, idempotency_key, labels, watch: then_watch } => {
            let mut request = input::read_batch(&file)?;
            if let Some(key) = idempotency_key {
                request.idempotency_key = key;
            }
            request.labels.extend(labels);
            let response = farm.render().submit_batch(request).await.map_err(|s| farm.explain(s))?.into_inner();
            let batch = response.batch.context("coordinator returned no batch")?;
            emit(json, json!({ "created": response.created, "batch": output::batch(&batch), "warnings": response.warnings }), || {
                let verb = if response.created { "submitted" } else { "already submitted" };
                format!("{verb} batch {} ({} jobs)", batch.id, batch.total_jobs)
            });
            for warning in &response.warnings {
                eprintln!("warning: {warning}");
            }
            if then_watch {
                return watch(&farm, &batch.id, json).await;
            }
        }
        Command::Watch { batch } => return watch(&farm, &batch, json).await,
        Command::Batch { batch } => {
            let b = farm.render().get_batch(pb::GetBatchRequest { batch_id: batch }).await.map_err(|s| farm.explain(s))?.into_inner();
            emit(json, output::batch(&b), || {
                format!(
                    "batch {} by {} · {} jobs · {:.1} gpu-seconds\n{}",
                    b.id,
                    b.submitter,
                    b.total_jobs,
                    b.gpu_seconds,
                    output::counts_line(&b.counts)
                )
            });
        }
        Command::Jobs { command } => jobs(&farm, command, json).await?,
        Command::Queue { command } => {
            let mut admin = farm.admin();
            let state = match command {
                QueueCommand::Pause { model, reason } => admin
                    .pause_queue(pb::PauseQueueRequest { model: model.unwrap_or_default(), reason: reason.unwrap_or_default() })
                    .await
                    .map_err(|s| farm.explain(s))?
                    .into_inner(),
                QueueCommand::Resume { model } => admin
                    .resume_queue(pb::ResumeQueueRequest { model: model.unwrap_or_default() })
                    .await
                    .map_err(|s| farm.explain(s))?
                    .into_inner(),
                QueueCommand::Stats { model } => {
                    let stats = admin
                        .get_queue_stats(pb::GetQueueStatsRequest { model: model.unwrap_or_default() })
                        .await
                        .map_err(|s| farm.explain(s))?
                        .into_inner();
                    emit(json, output::queue_stats(&stats), || output::queue_stats_text(&stats));
                    return Ok(ExitCode::SUCCESS);
                }
            };
            let scope = if state.model.is_empty() { "all models".to_owned() } else { format!("model {}", state.model) };
            emit(json, output::queue_state(&state), || format!("queue for {scope}: {}", if state.paused { "paused" } else { "running" }));
        }
        Command::Top { interval, once } => {
            if !(interval.is_finite() && interval >= 0.1) {
                bail!("--interval must be at least 0.1 seconds");
            }
            top(&farm, json, std::time::Duration::from_secs_f64(interval), once).await?;
        }
        Command::Workers { command } => {
            let mut admin = farm.admin();
            let worker = match command {
                WorkersCommand::List { all } => {
                    let list =
                        admin.list_workers(pb::ListWorkersRequest { include_gone: all }).await.map_err(|s| farm.explain(s))?.into_inner();
                    emit(json, json!(list.workers.iter().map(output::worker).collect::<Vec<_>>()), || {
                        if list.workers.is_empty() {
                            return "no workers".to_owned();
                        }
                        list.workers.iter().map(output::worker_line).collect::<Vec<_>>().join("\n")
                    });
                    return Ok(ExitCode::SUCCESS);
                }
                WorkersCommand::Drain { worker } => admin.drain_worker(pb::WorkerRef { worker_id: worker }).await,
                WorkersCommand::Cordon { worker } => admin.cordon_worker(pb::WorkerRef { worker_id: worker }).await,
                WorkersCommand::Uncordon { worker } => admin.uncordon_worker(pb::WorkerRef { worker_id: worker }).await,
            }
            .map_err(|s| farm.explain(s))?
            .into_inner();
            emit(json, output::worker(&worker), || format!("worker {} is {}", worker.id, output::worker_state_name(worker.state)));
        }
        Command::Tokens { command } => farmctl::tokens::run(&farm, command, json).await?,
        Command::Results { command: ResultsCommand::Fetch { batch, out, contact_sheet, sheet_cell } } => {
            let sheet = contact_sheet.then_some(sheet_cell);
            fetch_results(&farm, &batch, &out, sheet, json).await?
        }
    }
    Ok(ExitCode::SUCCESS)
}
