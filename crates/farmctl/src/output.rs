//! Turning API messages into JSON (for `--json`) and into text lines.

use flowfarm_proto::v1 as pb;
use serde_json::{json, Value};

pub fn time(ts: &Option<prost_types::Timestamp>) -> Value {
    match ts {
        Some(ts) => match chrono::DateTime::from_timestamp(ts.seconds, ts.nanos.max(0) as u32) {
            Some(at) => Value::String(at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)),
            None => Value::Null,
        },
        None => Value::Null,
    }
}

pub fn state_name(state: i32) -> &'static str {
    match pb::JobState::try_from(state) {
        Ok(pb::JobState::Queued) => "queued",
        Ok(pb::JobState::Dispatched) => "dispatched",
        Ok(pb::JobState::Running) => "running",
        Ok(pb::JobState::Succeeded) => "succeeded",
        Ok(pb::JobState::Failed) => "failed",
        Ok(pb::JobState::Cancelled) => "cancelled",
        Ok(pb::JobState::Dead) => "dead",
        _ => "unspecified",
    }
}

fn encoders_name(set: i32) -> &'static str {
    match pb::TextEncoderSet::try_from(set) {
        Ok(pb::TextEncoderSet::All) => "all",
        Ok(pb::TextEncoderSet::ClipOnly) => "clip-only",
        _ => "default",
    }
}

pub fn worker_state_name(state: i32) -> &'static str {
    match pb::WorkerState::try_from(state) {
        Ok(pb::WorkerState::Active) => "active",
        Ok(pb::WorkerState::Draining) => "draining",
        Ok(pb::WorkerState::Cordoned) => "cordoned",
        Ok(pb::WorkerState::Lost) => "lost",
        Ok(pb::WorkerState::Gone) => "gone",
        _ => "unspecified",
    }
}

pub fn counts(c: &Option<pb::JobCounts>) -> Value {
    let c = c.unwrap_or_default();
    json!({
        "queued": c.queued, "dispatched": c.dispatched, "running": c.running, "succeeded": c.succeeded,
        "failed": c.failed, "cancelled": c.cancelled, "dead": c.dead,
    })
}

pub fn counts_line(c: &Option<pb::JobCounts>) -> String {
    let c = c.unwrap_or_default();
    format!(
        "queued {} · dispatched {} · running {} · succeeded {} · failed {} · cancelled {} · dead {}",
        c.queued, c.dispatched, c.running, c.succeeded, c.failed, c.cancelled, c.dead
    )
}

pub fn batch(b: &pb::Batch) -> Value {
    json!({
        "id": b.id, "idempotency_key": b.idempotency_key, "submitter": b.submitter, "labels": b.labels,
        "created_at": time(&b.created_at), "total_jobs": b.total_jobs, "counts": counts(&b.counts),
        "gpu_seconds": b.gpu_seconds,
    })
}

pub fn job(j: &pb::Job) -> Value {
    let s = j.spec.clone().unwrap_or_default();
    json!({
        "id": j.id, "batch_id": j.batch_id, "index": j.index, "state": state_name(j.state), "attempt": j.attempt,
        "worker_id": j.worker_id, "lease_expires_at": time(&j.lease_expires_at), "progress_step": j.progress_step,
        "error": j.error, "gpu_seconds": j.gpu_seconds,
        "result": j.result.as_ref().map(|r| json!({
            "key": r.key, "sha256": r.sha256, "size_bytes": r.size_bytes, "content_type": r.content_type,
            "model_hash": r.model_hash,
        })),
        "spec": {
            "model": s.model, "prompt": s.prompt, "negative_prompt": s.negative_prompt, "width": s.width,
            "height": s.height, "steps": s.steps, "guidance_scale": s.guidance_scale, "seed": s.seed,
            "shift": s.shift, "text_encoders": encoders_name(s.text_encoders), "priority": s.priority,
            "max_attempts": s.max_attempts, "labels": s.labels, "tile_vae": s.tile_vae,
        },
        "created_at": time(&j.created_at), "updated_at": time(&j.updated_at),
    })
}

pub fn job_line(j: &pb::Job) -> String {
    let s = j.spec.clone().unwrap_or_default();
    format!(
        "{}  {:<10} attempt {}  {}×{} {} steps seed {}  {}",
        j.id,
        state_name(j.state),
        j.attempt,
        s.width,
        s.height,
        s.steps,
        s.seed.unwrap_or(0),
        truncate(&s.prompt, 48)
    )
}

pub fn event(e: &pb::JobEvent) -> Value {
    json!({
        "id": e.id, "job_id": e.job_id, "from": state_name(e.from_state), "to": state_name(e.to_state),
        "attempt": e.attempt, "actor": e.actor, "reason": e.reason, "at": time(&e.at),
    })
}

pub fn worker(w: &pb::Worker) -> Value {
    json!({
        "id": w.id, "name": w.name, "hostname": w.hostname, "state": worker_state_name(w.state),
        "devices": w.devices.iter().map(|d| json!({
            "name": d.name, "memory_bytes": d.memory_bytes, "busy_slots": d.busy_slots, "images_done": d.images_done,
            "busy_seconds": d.busy_seconds,
        })).collect::<Vec<_>>(),
        "models": w.models, "model_hashes": w.model_hashes,
        "placements": w.placements.iter().map(|(m, p)| (m.clone(), json!({
            "parallel": p.parallel, "units": p.units, "encoders": p.encoders, "max_batch": p.max_batch,
        }))).collect::<serde_json::Map<_, _>>(),
        "capacity": w.capacity, "current_job_ids": w.current_job_ids,
        "images_done": w.images_done, "gpu_seconds": w.gpu_seconds,
        "registered_at": time(&w.registered_at), "last_heartbeat_at": time(&w.last_heartbeat_at),
    })
}

/// One line of `workers list` and `top`.
pub fn worker_line(w: &pb::Worker) -> String {
    let heartbeat = w.last_heartbeat_at.as_ref().map_or_else(String::new, |t| {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64);
        format!("  heartbeat {}s ago", (now - t.seconds).max(0))
    });
    format!(
        "{}  {:<9} {:<20} jobs {}/{}  images {}  gpu {:.0}s  models {}{heartbeat}",
        w.id,
        worker_state_name(w.state),
        w.name,
        w.current_job_ids.len(),
        w.capacity,
        w.images_done,
        w.gpu_seconds,
        w.models
            .iter()
            .map(|m| {
                let named = match w.model_hashes.get(m) {
                    // The short form image tools show as "Model hash".
                    Some(h) if h.get(..10).is_some() => format!("{m}@{}", &h[..10]),
                    _ => m.clone(),
                };
                match w.placements.get(m) {
                    Some(p) => format!("{named} ({})", placement_text(p)),
                    None => named,
                }
            })
            .collect::<Vec<_>>()
            .join(","),
    ) + &device_lines(w)
}

/// How a model is served, in words: "cfg on cpu:0+cpu:1, batches of 4, encoders on cpu".
pub fn placement_text(p: &pb::ModelPlacement) -> String {
    let mut text = format!("{} on {}", p.parallel, p.units.join(","));
    if p.max_batch > 1 {
        text.push_str(&format!(", batches of {}", p.max_batch));
    }
    if p.encoders != "same" && !p.encoders.is_empty() {
        text.push_str(&format!(", encoders on {}", p.encoders));
    }
    text
}

/// With several devices, one indented line per device: its jobs now, images
/// and busy seconds.
fn device_lines(w: &pb::Worker) -> String {
    if w.devices.len() < 2 {
        return String::new();
    }
    w.devices
        .iter()
        .map(|d| format!("\n    {:<24} jobs {}  images {}  busy {:.0}s", d.name, d.busy_slots, d.images_done, d.busy_seconds))
        .collect()
}

/// `queue stats` as text.
pub fn queue_stats_text(stats: &pb::QueueStats) -> String {
    let mut text = format!("queue {}\ntotal: {}", if stats.paused { "PAUSED" } else { "running" }, counts_line(&stats.total));
    for m in &stats.models {
        text.push_str(&format!(
            "\n{}{}: {} · oldest queued {:.0}s",
            m.model,
            if m.paused { " (paused)" } else { "" },
            counts_line(&m.counts),
            m.oldest_queued_seconds
        ));
        for w in &m.waiting_for_worker {
            text.push_str(&format!(
                "\n  {} job(s) waiting for a worker serving {} with text encoders {}",
                w.jobs,
                m.model,
                encoders_name(w.text_encoders)
            ));
        }
    }
    if !stats.submitters.is_empty() {
        let usage: Vec<String> = stats.submitters.iter().map(|u| format!("{} {:.1}s", u.submitter, u.gpu_seconds)).collect();
        text.push_str(&format!("\ngpu-seconds by submitter: {}", usage.join(", ")));
    }
    text
}

pub fn queue_state(q: &pb::QueueState) -> Value {
    json!({
        "model": q.model, "paused": q.paused, "reason": q.reason, "updated_by": q.updated_by,
        "updated_at": time(&q.updated_at),
    })
}

pub fn queue_stats(s: &pb::QueueStats) -> Value {
    json!({
        "paused": s.paused,
        "total": counts(&s.total),
        "models": s.models.iter().map(|m| json!({
            "model": m.model, "paused": m.paused, "counts": counts(&m.counts),
            "oldest_queued_seconds": m.oldest_queued_seconds,
            "waiting_for_worker": m.waiting_for_worker.iter().map(|w| json!({
                "text_encoders": encoders_name(w.text_encoders), "jobs": w.jobs,
            })).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
        "submitters": s.submitters.iter().map(|u| json!({ "submitter": u.submitter, "gpu_seconds": u.gpu_seconds })).collect::<Vec<_>>(),
    })
}

fn truncate(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_owned()
    } else {
        let cut: String = s.chars().take(max - 1).collect();
        format!("{cut}…")
    }
}
