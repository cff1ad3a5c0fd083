//! Claiming: a read's deliveries started with one StartJobs call, and
//! acknowledged once settled.

use std::time::{Duration, Instant};

use flowfarm_proto::v1 as pb;
use flowfarm_queue::Delivery;
use tonic::Code;

use super::*;

/// Claims a read's deliveries with one StartJobs call (per-job StartJob
/// against a coordinator without it). None: nothing to run (refused,
/// malformed); that message is then acknowledged.
pub(super) async fn claim_all(shared: &Shared, deliveries: Vec<Delivery>) -> Vec<(Delivery, Option<pb::StartJobResponse>)> {
    let mut claimed: Vec<(Delivery, Option<pb::StartJobResponse>)> = Vec::with_capacity(deliveries.len());
    let mut pending = Vec::new();
    // A re-dispatched job may come twice in one read: claim it once.
    let mut seen = std::collections::HashSet::new();
    // A job this worker already renders (a duplicate message): claiming it
    // again would be answered with the running job, and render it twice.
    seen.extend(lock(&shared.running).keys().copied());
    for delivery in deliveries {
        match &delivery.job {
            Ok(message) if seen.insert(message.job_id) => pending.push((message.job_id, delivery)),
            Ok(_) => claimed.push((delivery, None)),
            Err(why) => {
                tracing::warn!(message = %delivery.message_id, %why, "dropping a malformed work message");
                claimed.push((delivery, None));
            }
        }
    }
    let mut rounds = 0;
    let claiming_since = Instant::now();
    while !pending.is_empty() {
        rounds += 1;
        let request =
            pb::StartJobsRequest { worker_id: shared.worker_id.clone(), job_ids: pending.iter().map(|(id, _)| id.to_string()).collect() };
        let answer = retrying("StartJobs", REPORT_PATIENCE, || {
            let mut client = shared.client.clone();
            let request = request.clone();
            async move { client.start_jobs(request).await }
        })
        .await;
        let outcomes = match answer {
            Ok(response) => response.into_inner().outcomes,
            Err(status) if status.code() == Code::Unimplemented => {
                for (_, delivery) in pending.drain(..) {
                    let start = claim_one(shared, &delivery).await;
                    claimed.push((delivery, start));
                }
                break;
            }
            Err(status) => {
                tracing::warn!(code = ?status.code(), reason = %status.message(), "cannot claim a read; leaving it to re-dispatch");
                claimed.extend(pending.drain(..).map(|(_, d)| (d, None)));
                break;
            }
        };
        let mut retry = Vec::new();
        for ((job_id, delivery), outcome) in pending.drain(..).zip(outcomes) {
            match outcome.outcome {
                Some(pb::start_job_outcome::Outcome::Started(start)) => claimed.push((delivery, Some(start))),
                // The coordinator could not reach its database: not an answer.
                // Claims are idempotent, so asking again is safe.
                Some(pb::start_job_outcome::Outcome::Refused(r))
                    if transient_code(Code::from_i32(r.code)) && claiming_since.elapsed() < REPORT_PATIENCE =>
                {
                    retry.push((job_id, delivery));
                }
                refused => {
                    // FAILED_PRECONDITION: a duplicate, cancelled, or passed to another worker.
                    let reason = match refused {
                        Some(pb::start_job_outcome::Outcome::Refused(r)) => r.message,
                        _ => "no outcome".into(),
                    };
                    tracing::debug!(job = %job_id, %reason, "not started");
                    claimed.push((delivery, None));
                }
            }
        }
        if !retry.is_empty() {
            tokio::time::sleep(jitter(Duration::from_millis(100 << rounds.min(6)))).await;
        }
        pending = retry;
    }
    claimed
}

/// StartJob for one delivery, for coordinators without StartJobs.
pub(super) async fn claim_one(shared: &Shared, delivery: &Delivery) -> Option<pb::StartJobResponse> {
    let message = *delivery.job.as_ref().ok()?;
    let request = pb::StartJobRequest { worker_id: shared.worker_id.clone(), job_id: message.job_id.to_string() };
    let started = retrying("StartJob", REPORT_PATIENCE, || {
        let mut client = shared.client.clone();
        let request = request.clone();
        async move { client.start_job(request).await }
    })
    .await;
    match started {
        Ok(response) => Some(response.into_inner()),
        Err(status) => {
            tracing::debug!(job = %message.job_id, code = ?status.code(), reason = %status.message(), "not started");
            None
        }
    }
}

pub(super) async fn acknowledge(shared: &Shared, delivery: &Delivery) {
    let mut pause = Duration::from_millis(100);
    for _ in 0..8 {
        match shared.consumer.ack(delivery).await {
            Ok(()) => return,
            Err(e) => {
                tracing::warn!(error = %e, "cannot acknowledge a work message; retrying");
                tokio::time::sleep(jitter(pause)).await;
                pause *= 2;
            }
        }
    }
    // Left pending: the coordinator sweeps it later; the job itself is settled in Postgres.
}
