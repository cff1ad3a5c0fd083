//! `farmctl`: submit and watch batches, run the queue, watch the fleet.
//!
//! Exit status: 0 on success, 1 on any error (the message says what to do),
//! 2 on a usage error, 3 when `watch` ends with jobs that did not succeed.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Args, CommandFactory, Parser, Subcommand};
use flowfarm_proto::v1 as pb;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;
use sha2::{Digest, Sha256};
use tokio_stream::StreamExt;

use farmctl::client::Farm;
use farmctl::{input, output};

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

#[derive(Args)]
struct Selection {
    /// Job ids.
    jobs: Vec<String>,
    /// Every job of this batch instead.
    #[arg(long, conflicts_with = "jobs")]
    batch: Option<String>,
}

impl Selection {
    fn parts(&self) -> (Vec<String>, String) {
        (self.jobs.clone(), self.batch.clone().unwrap_or_default())
    }

    fn selector(&self) -> pb::JobSelector {
        let (job_ids, batch_id) = self.parts();
        pb::JobSelector { job_ids, batch_id }
    }
}

#[derive(Subcommand)]
enum JobsCommand {
    /// List jobs (all pages unless --limit).
    List {
        #[arg(long)]
        batch: Option<String>,
        /// queued, dispatched, running, succeeded, failed, cancelled or dead; repeatable.
        #[arg(long = "state", value_parser = parse_state)]
        states: Vec<pb::JobState>,
        /// `key=value`.
        #[arg(long)]
        label: Option<String>,
        #[arg(long)]
        model: Option<String>,
        /// Stop after this many jobs.
        #[arg(long)]
        limit: Option<usize>,
    },
    /// Show one job.
    Show { job: String },
    /// Cancel jobs that have not finished.
    Cancel {
        #[command(flatten)]
        selection: Selection,
        #[arg(long)]
        reason: Option<String>,
    },
    /// Put failed, dead or cancelled jobs back in the queue (admin).
    Retry {
        #[command(flatten)]
        selection: Selection,
        #[arg(long)]
        reason: Option<String>,
    },
    /// Take dispatched or running jobs back to the queue (admin).
    Requeue {
        #[command(flatten)]
        selection: Selection,
        #[arg(long)]
        reason: Option<String>,
    },
    /// Set the priority of queued jobs, -1000..=1000 (admin).
    Priority {
        #[arg(allow_negative_numbers = true)]
        priority: i32,
        #[command(flatten)]
        selection: Selection,
    },
    /// Delete finished jobs (admin).
    Purge {
        #[command(flatten)]
        selection: Selection,
        /// Instead of a selection: finished jobs last changed more than this many seconds ago.
        #[arg(long, conflicts_with_all = ["jobs", "batch"])]
        older_than: Option<u64>,
    },
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

#[derive(Subcommand)]
enum ResultsCommand {
    /// Write the images of a batch's succeeded jobs to DIR.
    Fetch {
        batch: String,
        #[arg(long)]
        out: PathBuf,
        /// Also write DIR/contact-sheet.png: the images side by side in job
        /// order (the first 1024 of a larger batch).
        #[arg(long)]
        contact_sheet: bool,
        /// Pixels of each image's square on the contact sheet.
        #[arg(long, default_value_t = 256)]
        sheet_cell: u32,
    },
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    s.split_once('=').map(|(k, v)| (k.to_owned(), v.to_owned())).ok_or_else(|| format!("`{s}` is not key=value"))
}

fn parse_state(s: &str) -> Result<pb::JobState, String> {
    let state = match s {
        "queued" => pb::JobState::Queued,
        "dispatched" => pb::JobState::Dispatched,
        "running" => pb::JobState::Running,
        "succeeded" => pb::JobState::Succeeded,
        "failed" => pb::JobState::Failed,
        "cancelled" => pb::JobState::Cancelled,
        "dead" => pb::JobState::Dead,
        _ => return Err(format!("`{s}` is not a job state (queued, dispatched, running, succeeded, failed, cancelled, dead)")),
    };
    Ok(state)
}

/// Prints `value` as JSON when asked, else the text.
fn emit(json: bool, value: serde_json::Value, text: impl FnOnce() -> String) {
    if json {
        println!("{value}");
    } else {
        println!("{}", text());
    }
}

/// `farmctl top`: redraws queue figures, throughput since the previous
/// frame, and the workers, until Ctrl-C.
async fn top(farm: &Farm, json: bool, interval: std::time::Duration, once: bool) -> Result<()> {
    let mut admin = farm.admin();
    let mut previous: Option<(std::time::Instant, u64)> = None;
    let redraw = !once && !json && std::io::IsTerminal::is_terminal(&std::io::stdout());
    loop {
        let stats = admin.get_queue_stats(pb::GetQueueStatsRequest::default()).await.map_err(|s| farm.explain(s))?.into_inner();
        let workers =
            admin.list_workers(pb::ListWorkersRequest { include_gone: false }).await.map_err(|s| farm.explain(s))?.into_inner().workers;
        let finished = stats.total.as_ref().map_or(0, |c| c.succeeded + c.failed + c.dead);
        let now = std::time::Instant::now();
        let rate = previous.map(|(at, n)| finished.saturating_sub(n) as f64 / (now - at).as_secs_f64().max(1e-3));
        previous = Some((now, finished));
        if json {
            println!(
                "{}",
                json!({
                    "queue": output::queue_stats(&stats),
                    "finished_per_second": rate,
                    "workers": workers.iter().map(output::worker).collect::<Vec<_>>(),
                })
            );
        } else {
            let mut frame = String::new();
            if redraw {
                frame.push_str("\x1b[2J\x1b[H");
            }
            frame.push_str(&output::queue_stats_text(&stats));
            frame.push_str(&match rate {
                Some(r) => format!("\nthroughput: {r:.1} jobs/s finished"),
                None => "\nthroughput: (next frame)".into(),
            });
            frame.push_str(&format!("\nworkers: {}", workers.len()));
            for w in &workers {
                frame.push_str("\n  ");
                frame.push_str(&output::worker_line(w));
            }
            println!("{frame}");
        }
        if once {
            return Ok(());
        }
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = tokio::signal::ctrl_c() => return Ok(()),
        }
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

async fn jobs(farm: &Farm, command: JobsCommand, json: bool) -> Result<()> {
    let explain = |s| farm.explain(s);
    let updated = |verb: &str, n: u64| {
        emit(json, json!({ "updated": n }), || format!("{verb} {n} job{}", if n == 1 { "" } else { "s" }));
    };
    match command {
        JobsCommand::List { batch, states, label, model, limit } => {
            let mut render = farm.render();
            let mut page_token = String::new();
            let mut shown = 0usize;
            let mut all = Vec::new();
            loop {
                let page = render
                    .list_jobs(pb::ListJobsRequest {
                        batch_id: batch.clone().unwrap_or_default(),
                        states: states.iter().map(|s| *s as i32).collect(),
                        label: label.clone().unwrap_or_default(),
                        model: model.clone().unwrap_or_default(),
                        page_size: 1000,
                        page_token,
                    })
                    .await
                    .map_err(explain)?
                    .into_inner();
                for job in &page.jobs {
                    if limit.is_some_and(|l| shown >= l) {
                        break;
                    }
                    shown += 1;
                    if json {
                        all.push(output::job(job));
                    } else {
                        println!("{}", output::job_line(job));
                    }
                }
                if page.next_page_token.is_empty() || limit.is_some_and(|l| shown >= l) {
                    break;
                }
                page_token = page.next_page_token;
            }
            if json {
                println!("{}", serde_json::Value::Array(all));
            }
        }
        JobsCommand::Show { job } => {
            let j = farm.render().get_job(pb::GetJobRequest { job_id: job }).await.map_err(explain)?.into_inner();
            emit(json, output::job(&j), || serde_json::to_string_pretty(&output::job(&j)).unwrap_or_default());
        }
        JobsCommand::Cancel { selection, reason } => {
            let (job_ids, batch_id) = selection.parts();
            let r = farm
                .render()
                .cancel_jobs(pb::CancelJobsRequest { job_ids, batch_id, reason: reason.unwrap_or_default() })
                .await
                .map_err(explain)?
                .into_inner();
            updated("cancelled", r.cancelled);
        }
        JobsCommand::Retry { selection, reason } => {
            let r = farm
                .admin()
                .retry_jobs(pb::RetryJobsRequest { jobs: Some(selection.selector()), reason: reason.unwrap_or_default() })
                .await
                .map_err(explain)?
                .into_inner();
            updated("retried", r.updated);
        }
        JobsCommand::Requeue { selection, reason } => {
            let r = farm
                .admin()
                .requeue_jobs(pb::RequeueJobsRequest { jobs: Some(selection.selector()), reason: reason.unwrap_or_default() })
                .await
                .map_err(explain)?
                .into_inner();
            updated("requeued", r.updated);
        }
        JobsCommand::Priority { priority, selection } => {
            let r = farm
                .admin()
                .set_priority(pb::SetPriorityRequest { jobs: Some(selection.selector()), priority })
                .await
                .map_err(explain)?
                .into_inner();
            updated("reprioritised", r.updated);
        }
        JobsCommand::Purge { selection, older_than } => {
            let jobs = (older_than.is_none()).then(|| selection.selector());
            let r = farm
                .admin()
                .purge_jobs(pb::PurgeJobsRequest { jobs, older_than_seconds: older_than.unwrap_or(0) })
                .await
                .map_err(explain)?
                .into_inner();
            updated("purged", r.updated);
        }
    }
    Ok(())
}

/// Follows a batch until it is finished. Exit 3 if any job did not succeed.
async fn watch(farm: &Farm, batch_id: &str, json: bool) -> Result<ExitCode> {
    let mut stream = farm
        .render()
        .watch_batch(pb::WatchBatchRequest { batch_id: batch_id.to_owned(), ..Default::default() })
        .await
        .map_err(|s| farm.explain(s))?
        .into_inner();
    let bar = if json { ProgressBar::hidden() } else { ProgressBar::new(0) };
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:40} {pos}/{len} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut last: Option<pb::Batch> = None;
    let mut steps: HashMap<String, (u32, u32)> = HashMap::new();
    while let Some(message) = stream.next().await {
        let message = message.map_err(|s| farm.explain(s))?;
        match message.event {
            Some(pb::watch_batch_event::Event::Snapshot(batch)) => {
                if json {
                    println!("{}", json!({ "snapshot": output::batch(&batch) }));
                }
                let counts = batch.counts.unwrap_or_default();
                bar.set_length(batch.total_jobs);
                bar.set_position(counts.succeeded + counts.failed + counts.cancelled + counts.dead);
                last = Some(batch);
            }
            Some(pb::watch_batch_event::Event::StateChange(event)) => {
                if json {
                    println!("{}", json!({ "state_change": output::event(&event) }));
                }
                let terminal = |s: i32| {
                    matches!(
                        pb::JobState::try_from(s),
                        Ok(pb::JobState::Succeeded | pb::JobState::Failed | pb::JobState::Cancelled | pb::JobState::Dead)
                    )
                };
                if terminal(event.to_state) && !terminal(event.from_state) {
                    bar.inc(1);
                    steps.remove(&event.job_id);
                } else if terminal(event.from_state) && !terminal(event.to_state) {
                    bar.set_position(bar.position().saturating_sub(1));
                }
                if matches!(pb::JobState::try_from(event.to_state), Ok(pb::JobState::Failed | pb::JobState::Dead)) {
                    bar.println(format!("job {} {}: {}", event.job_id, output::state_name(event.to_state), event.reason));
                }
            }
            Some(pb::watch_batch_event::Event::Progress(p)) => {
                if json {
                    println!(
                        "{}",
                        json!({ "progress": { "job_id": p.job_id, "attempt": p.attempt, "step": p.step, "total_steps": p.total_steps } })
                    );
                }
                steps.insert(p.job_id.clone(), (p.step, p.total_steps));
                let (done, total) = steps.values().fold((0u32, 0u32), |acc, (s, t)| (acc.0 + s, acc.1 + t));
                bar.set_message(format!("{} rendering, {done}/{total} steps", steps.len()));
            }
            None => {}
        }
    }
    bar.finish_and_clear();
    let batch = last.context("the watch stream ended before sending the batch")?;
    let counts = batch.counts.unwrap_or_default();
    let unsuccessful = counts.failed + counts.cancelled + counts.dead;
    if !json {
        println!("batch {}: {}", batch.id, output::counts_line(&batch.counts));
    }
    if counts.succeeded + unsuccessful < batch.total_jobs {
        bail!("the watch stream ended before the batch finished; run `farmctl watch {}` again", batch.id);
    }
    Ok(if unsuccessful > 0 { ExitCode::from(3) } else { ExitCode::SUCCESS })
}

/// Downloads every succeeded job's image into `out` as `<index>-<job id>.png`,
/// checking each against its SHA-256; files appear only once complete. With
/// `sheet` (a cell size), also writes `out/contact-sheet.png`.
async fn fetch_results(farm: &Farm, batch_id: &str, out: &Path, sheet: Option<u32>, json: bool) -> Result<()> {
    if let Some(cell) = sheet {
        // Checked before anything is downloaded.
        if !(16..=2048).contains(&cell) {
            bail!("{}", farmctl::contact_sheet::SheetError::Cell(cell));
        }
    }
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let mut render = farm.render();
    let mut page_token = String::new();
    let mut written = Vec::new();
    loop {
        let page = render
            .list_jobs(pb::ListJobsRequest {
                batch_id: batch_id.to_owned(),
                states: vec![pb::JobState::Succeeded as i32],
                page_size: 1000,
                page_token,
                ..Default::default()
            })
            .await
            .map_err(|s| farm.explain(s))?
            .into_inner();
        for job in &page.jobs {
            let expected = job.result.clone().unwrap_or_default();
            let extension = if expected.content_type == "image/png" { "png" } else { "bin" };
            let path = out.join(format!("{:05}-{}.{extension}", job.index, job.id));
            let partial = path.with_extension("partial");
            let mut stream =
                render.get_result(pb::GetResultRequest { job_id: job.id.clone() }).await.map_err(|s| farm.explain(s))?.into_inner();
            let mut file = std::fs::File::create(&partial).with_context(|| format!("cannot write {}", partial.display()))?;
            let mut hasher = Sha256::new();
            while let Some(chunk) = stream.next().await {
                let chunk = chunk.map_err(|s| farm.explain(s))?;
                hasher.update(&chunk.data);
                file.write_all(&chunk.data)?;
            }
            file.sync_all()?;
            let digest = hex_string(&hasher.finalize());
            if digest != expected.sha256 {
                let _ = std::fs::remove_file(&partial);
                bail!("job {}: downloaded image has SHA-256 {digest}, the coordinator recorded {}", job.id, expected.sha256);
            }
            std::fs::rename(&partial, &path)?;
            written.push(path);
        }
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    let contact_sheet = match sheet {
        Some(cell) => Some(write_contact_sheet(&written, out, cell)?),
        None => None,
    };
    emit(json, json!({ "written": written, "contact_sheet": contact_sheet }), || {
        let mut text = format!("wrote {} images to {}", written.len(), out.display());
        if let Some(path) = &contact_sheet {
            text.push_str(&format!("\ncontact sheet: {}", path.display()));
        }
        text
    });
    Ok(())
}

/// `out/contact-sheet.png` of the PNGs among `images` (in job order).
fn write_contact_sheet(images: &[PathBuf], out: &Path, cell: u32) -> Result<PathBuf> {
    let pngs: Vec<&PathBuf> = images.iter().filter(|p| p.extension().is_some_and(|e| e == "png")).collect();
    if pngs.len() > farmctl::contact_sheet::MAX_IMAGES {
        eprintln!("note: the contact sheet shows the first {} of {} images", farmctl::contact_sheet::MAX_IMAGES, pngs.len());
    }
    let bytes = pngs
        .iter()
        .take(farmctl::contact_sheet::MAX_IMAGES)
        .map(|p| std::fs::read(p).with_context(|| format!("cannot read {}", p.display())))
        .collect::<Result<Vec<_>>>()?;
    let sheet = farmctl::contact_sheet::compose(&bytes, cell)?;
    let path = out.join("contact-sheet.png");
    let partial = path.with_extension("partial");
    std::fs::write(&partial, sheet).with_context(|| format!("cannot write {}", partial.display()))?;
    std::fs::rename(&partial, &path)?;
    Ok(path)
}

fn hex_string(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
