//! Heartbeats: leases renewed, the operators' wishes learned, revoked jobs stopped.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use flowfarm_proto::v1 as pb;
use uuid::Uuid;

use super::*;

/// Sends heartbeats: renews leases, learns the operators' wishes, stops
/// revoked jobs.
pub(super) async fn heartbeat_loop(shared: Arc<Shared>, interval: Duration, stop: tokio_util::sync::CancellationToken) {
    let mut failing = false;
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(interval) => {}
        }
        let running: Vec<pb::RunningJob> =
            lock(&shared.running).iter().map(|(id, r)| pb::RunningJob { job_id: id.to_string(), attempt: r.attempt }).collect();
        // Device time is reported per attempt, with its completion or failure.
        let request =
            pb::HeartbeatRequest { worker_id: shared.worker_id.clone(), gpu_seconds_delta: 0.0, running, devices: shared.devices.states() };
        // A call in flight does not hold up a stop (a coordinator that hangs).
        let Some(answer) = stop.run_until_cancelled(shared.client.clone().heartbeat(request)).await else { return };
        match answer {
            Ok(response) => {
                shared.metrics.set_ready(true);
                if failing {
                    tracing::info!("coordinator reachable again");
                    failing = false;
                }
                let response = response.into_inner();
                for id in &response.revoked_job_ids {
                    if let Some(job) = Uuid::parse_str(id).ok().and_then(|id| lock(&shared.running).get(&id).map(|j| j.revoked.clone())) {
                        tracing::info!(job = %id, "revoked by the coordinator");
                        job.store(true, Ordering::SeqCst);
                    }
                }
                let wanted = match pb::WorkerState::try_from(response.state) {
                    Ok(pb::WorkerState::Draining) => Some(Mode::Draining),
                    Ok(pb::WorkerState::Cordoned) => Some(Mode::Cordoned),
                    Ok(pb::WorkerState::Active) => Some(Mode::Active),
                    _ => None,
                };
                if let Some(wanted) = wanted {
                    shared.mode.send_if_modified(|mode| {
                        // A drain, once begun, is not undone.
                        let change = *mode != wanted && *mode != Mode::Draining;
                        if change {
                            tracing::info!(from = ?*mode, to = ?wanted, "state changed by an operator");
                            *mode = wanted;
                        }
                        change
                    });
                }
            }
            Err(status) => {
                shared.metrics.set_ready(false);
                if !failing {
                    tracing::warn!(error = %status.message(), "heartbeat failed; retrying");
                    failing = true;
                }
            }
        }
    }
}
