//! `farmctl jobs …`: list, show, cancel, and the operators' moves.

use anyhow::Result;
use clap::{Args, Subcommand};
use flowfarm_proto::v1 as pb;
use serde_json::json;

use crate::emit;
use farmctl::client::Farm;
use farmctl::output;

#[derive(Args)]
pub(crate) struct Selection {
    /// Job ids.
    jobs: Vec<String>,
    /// Every job of this batch instead.
    #[arg(long, conflicts_with = "jobs")]
    batch: Option<String>,
}

impl Selection {
    pub(crate) fn parts(&self) -> (Vec<String>, String) {
        (self.jobs.clone(), self.batch.clone().unwrap_or_default())
    }

    pub(crate) fn selector(&self) -> pb::JobSelector {
        let (job_ids, batch_id) = self.parts();
        pb::JobSelector { job_ids, batch_id }
    }
}

#[derive(Subcommand)]
pub(crate) enum JobsCommand {
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

pub(crate) fn parse_state(s: &str) -> Result<pb::JobState, String> {
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

pub(crate) async fn jobs(farm: &Farm, command: JobsCommand, json: bool) -> Result<()> {
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
