//! `farmctl watch`: follow a batch to its end.

use std::collections::HashMap;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use flowfarm_proto::v1 as pb;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;
use tokio_stream::StreamExt;
use tonic::Code;

use farmctl::client::Farm;
use farmctl::output;

/// How long the coordinator may stay unreachable (from the moment the
/// stream broke) before `watch` gives up: long enough for a restart or a
/// failover to another coordinator.
const RECONNECT_PATIENCE: Duration = Duration::from_secs(120);

/// Whether a broken stream is worth opening again: the coordinator went
/// away or restarted, rather than refusing the request.
fn reconnectable(status: &tonic::Status) -> bool {
    matches!(status.code(), Code::Unavailable | Code::Unknown | Code::Internal | Code::Cancelled | Code::DeadlineExceeded)
}

/// Follows a batch until it is finished. Exit 3 if any job did not succeed.
/// A stream that breaks (the coordinator restarted, a network hiccup) is
/// opened again after the last message's cursor, so nothing is missed or
/// counted twice.
pub(crate) async fn watch(farm: &Farm, batch_id: &str, json: bool) -> Result<ExitCode> {
    let bar = if json { ProgressBar::hidden() } else { ProgressBar::new(0) };
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:40} {pos}/{len} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut last: Option<pb::Batch> = None;
    let mut steps: HashMap<String, (u32, u32)> = HashMap::new();
    let mut cursor = String::new();
    // Since when the coordinator has not answered; None while it does.
    let mut lost: Option<Instant> = None;
    let mut pause = Duration::from_millis(200);
    loop {
        let opened = farm.render().watch_batch(pb::WatchBatchRequest { batch_id: batch_id.to_owned(), after: cursor.clone() }).await;
        let mut stream = match opened {
            Ok(stream) => stream.into_inner(),
            Err(status) if !cursor.is_empty() && reconnectable(&status) && lost.is_none_or(|t| t.elapsed() < RECONNECT_PATIENCE) => {
                lost.get_or_insert_with(Instant::now);
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(5));
                continue;
            }
            Err(status) => return Err(farm.explain(status)),
        };
        while let Some(message) = stream.next().await {
            let message = match message {
                Ok(message) => message,
                Err(status) if !cursor.is_empty() && reconnectable(&status) => {
                    bar.println(format!("lost the coordinator ({}); reconnecting", status.message()));
                    break;
                }
                Err(status) => return Err(farm.explain(status)),
            };
            (lost, pause) = (None, Duration::from_millis(200));
            cursor = message.cursor.clone();
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
        // The stream ends after the batch's last snapshot; one that ends or
        // breaks sooner was closed under us (a coordinator going away).
        let finished = last.as_ref().is_some_and(|b| {
            let c = b.counts.unwrap_or_default();
            c.succeeded + c.failed + c.cancelled + c.dead >= b.total_jobs
        });
        if finished || cursor.is_empty() || lost.get_or_insert_with(Instant::now).elapsed() >= RECONNECT_PATIENCE {
            break;
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(5));
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
