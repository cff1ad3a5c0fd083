//! Completions reported in groups (CompleteJobs), retried while the
//! coordinator is away.

use std::time::{Duration, Instant};

use flowfarm_group::Grouper;
use flowfarm_proto::v1 as pb;
use tonic::{Code, Status};

use super::*;

/// Most completions one CompleteJobs call carries.
pub(super) const MAX_REPORT_GROUP: usize = 64;

/// Sends completions in groups: one CompleteJobs for all that are waiting,
/// retried while the coordinator is away; each completion gets its own
/// answer. Falls back to CompleteJob against a coordinator without CompleteJobs.
pub(super) fn completion_reporter(client: Client, worker_id: String) -> Grouper<pb::CompletedJob, Result<(), Status>> {
    Grouper::new(MAX_REPORT_GROUP, move |jobs: Vec<pb::CompletedJob>| {
        let (client, worker_id) = (client.clone(), worker_id.clone());
        async move {
            match report_completions(&client, &worker_id, &jobs).await {
                Some(answers) => answers,
                None => report_completions_one_by_one(&client, &worker_id, jobs).await,
            }
        }
    })
}

/// One CompleteJobs for `jobs`, then again for those refused with a
/// transient code (the coordinator could not reach its database), until
/// each has a definite answer or [`REPORT_PATIENCE`] runs out. A repeated
/// completion of the same attempt is a no-op, so sending one again is safe.
/// None: the coordinator has no CompleteJobs.
pub(super) async fn report_completions(client: &Client, worker_id: &str, jobs: &[pb::CompletedJob]) -> Option<Vec<Result<(), Status>>> {
    let started = Instant::now();
    let mut answers: Vec<Option<Result<(), Status>>> = vec![None; jobs.len()];
    let mut pause = Duration::from_millis(100);
    loop {
        let open: Vec<usize> = (0..jobs.len()).filter(|&i| answers[i].is_none()).collect();
        let request = pb::CompleteJobsRequest { worker_id: worker_id.to_owned(), jobs: open.iter().map(|&i| jobs[i].clone()).collect() };
        let answer = retrying("CompleteJobs", REPORT_PATIENCE.saturating_sub(started.elapsed()), || {
            let mut client = client.clone();
            let request = request.clone();
            async move { client.complete_jobs(request).await }
        })
        .await;
        let outcomes = match answer {
            Ok(response) => response.into_inner().outcomes,
            Err(status) if status.code() == Code::Unimplemented => return None,
            Err(status) => {
                for &i in &open {
                    answers[i] = Some(Err(status.clone()));
                }
                break;
            }
        };
        let patient = started.elapsed() < REPORT_PATIENCE;
        for (n, &i) in open.iter().enumerate() {
            answers[i] = match outcomes.get(n) {
                Some(pb::CompleteJobOutcome { refused: None }) => Some(Ok(())),
                Some(pb::CompleteJobOutcome { refused: Some(r) }) => {
                    let status = Status::new(Code::from_i32(r.code), r.message.clone());
                    if transient(&status) && patient {
                        None
                    } else {
                        Some(Err(status))
                    }
                }
                None => Some(Err(Status::internal("the coordinator answered fewer completions than were sent"))),
            };
        }
        if answers.iter().all(Option::is_some) {
            break;
        }
        tokio::time::sleep(jitter(pause)).await;
        pause = (pause * 2).min(Duration::from_secs(5));
    }
    Some(answers.into_iter().map(|a| a.unwrap_or_else(|| Err(Status::unavailable("no answer")))).collect())
}

/// CompleteJob per job, for coordinators without CompleteJobs.
pub(super) async fn report_completions_one_by_one(
    client: &Client,
    worker_id: &str,
    jobs: Vec<pb::CompletedJob>,
) -> Vec<Result<(), Status>> {
    let mut answers = Vec::with_capacity(jobs.len());
    for job in jobs {
        let request = pb::CompleteJobRequest {
            worker_id: worker_id.to_owned(),
            job_id: job.job_id,
            attempt: job.attempt,
            result: job.result,
            gpu_seconds: job.gpu_seconds,
        };
        let answer = retrying("CompleteJob", REPORT_PATIENCE, || {
            let mut client = client.clone();
            let request = request.clone();
            async move { client.complete_job(request).await }
        })
        .await;
        answers.push(answer.map(|_| ()));
    }
    answers
}
