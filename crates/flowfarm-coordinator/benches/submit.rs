//! Bench (not a test): how long a 10,000-job grid takes to validate and store
//! through SubmitBatch, and through the store alone; then paging through it
//! with ListJobs and cancelling it. Prints figures; asserts nothing about time.
//!
//! `cargo bench -p flowfarm-coordinator --bench submit` (needs Postgres, as the tests do).

use std::time::{Duration, Instant};

use flowfarm_coordinator::convert::grid_request;
use flowfarm_proto::v1 as pb;
use flowfarm_store::NewBatch;
use flowfarm_testkit::{test_config, Harness};

const RUNS: usize = 5;

fn ten_thousand_job_grid() -> pb::SubmitBatchRequest {
    pb::SubmitBatchRequest {
        grid: Some(pb::JobGrid {
            base: Some(pb::JobSpec { model: "sd3".into(), steps: 28, ..Default::default() }),
            prompts: (0..100).map(|i| format!("a matte painting of castle number {i}, volumetric light")).collect(),
            seeds: (0..50).collect(),
            sizes: vec![pb::ImageSize { width: 1024, height: 1024 }, pb::ImageSize { width: 832, height: 1216 }],
        }),
        ..Default::default()
    }
}

fn summary(name: &str, mut times: Vec<Duration>) {
    times.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!(
        "{name:<44} min {:>8.1} ms   median {:>8.1} ms   max {:>8.1} ms   ({} runs)",
        ms(times[0]),
        ms(times[times.len() / 2]),
        ms(times[times.len() - 1]),
        times.len()
    );
}

#[tokio::main]
async fn main() {
    let h = Harness::start().await;
    let mut render = h.render();

    let mut grpc = Vec::new();
    let mut list = Vec::new();
    let mut cancel = Vec::new();
    for _ in 0..RUNS {
        let start = Instant::now();
        let batch = render.submit_batch(ten_thousand_job_grid()).await.expect("submit").into_inner().batch.expect("batch");
        grpc.push(start.elapsed());
        assert_eq!(batch.total_jobs, 10_000);

        let start = Instant::now();
        let mut token = String::new();
        let mut seen = 0;
        loop {
            let page = render
                .list_jobs(pb::ListJobsRequest { batch_id: batch.id.clone(), page_size: 1000, page_token: token, ..Default::default() })
                .await
                .expect("list")
                .into_inner();
            seen += page.jobs.len();
            if page.next_page_token.is_empty() {
                break;
            }
            token = page.next_page_token;
        }
        list.push(start.elapsed());
        assert_eq!(seen, 10_000);

        let start = Instant::now();
        let n = render
            .cancel_jobs(pb::CancelJobsRequest { batch_id: batch.id, ..Default::default() })
            .await
            .expect("cancel")
            .into_inner()
            .cancelled;
        cancel.push(start.elapsed());
        assert_eq!(n, 10_000);
    }

    // The same batch without gRPC: validation + expansion, then one transaction.
    let config = test_config();
    let registry = config.registry().expect("registry");
    let req = ten_thousand_job_grid();
    let mut validate = Vec::new();
    let mut store = Vec::new();
    for _ in 0..RUNS {
        let grid = req.grid.as_ref().expect("grid");
        let start = Instant::now();
        let jobs = grid_request(grid).expect("grid").resolve(&registry, &config.limits, &mut || 0).expect("valid");
        validate.push(start.elapsed());
        let batch = NewBatch {
            submitter: "bench".into(),
            idempotency_key: None,
            content_hash: vec![0; 32],
            labels: Default::default(),
            quotas: Default::default(),
        };
        let start = Instant::now();
        h.db.store.submit_batch(&batch, &jobs).await.expect("store");
        store.push(start.elapsed());
    }

    println!("10,000-job batch (100 prompts x 50 seeds x 2 sizes), Postgres on this machine:");
    summary("SubmitBatch over gRPC (validate+store)", grpc);
    summary("  validate and resolve 10,000 specs", validate);
    summary("  store: one transaction (UNNEST)", store);
    summary("ListJobs: all 10 pages of 1000", list);
    summary("CancelJobs: whole batch, 10,000 events", cancel);
    h.stop().await;
}
