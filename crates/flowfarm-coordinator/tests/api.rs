//! The gRPC API end to end against a real Postgres: auth on every RPC, input
//! validation, the worker protocol with leases and fencing, big batches,
//! watching, results, health and reflection.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use flowfarm_proto::v1 as pb;
use flowfarm_testkit::Harness;
use tokio_stream::StreamExt;
use tonic::Code;

fn ok_job() -> pb::JobSpec {
    pb::JobSpec { model: "sd3".into(), prompt: "a lighthouse at dusk".into(), ..Default::default() }
}

fn jobs(specs: Vec<pb::JobSpec>) -> pb::SubmitBatchRequest {
    pb::SubmitBatchRequest { jobs: specs, ..Default::default() }
}

fn job_with(f: impl FnOnce(&mut pb::JobSpec)) -> pb::SubmitBatchRequest {
    let mut spec = ok_job();
    f(&mut spec);
    jobs(vec![spec])
}

fn grid(prompts: &[&str], seeds: &[u64], sizes: &[(u32, u32)], base: impl FnOnce(&mut pb::JobSpec)) -> pb::SubmitBatchRequest {
    let mut spec = pb::JobSpec { model: "sd3".into(), ..Default::default() };
    base(&mut spec);
    pb::SubmitBatchRequest {
        grid: Some(pb::JobGrid {
            base: Some(spec),
            prompts: prompts.iter().map(|p| p.to_string()).collect(),
            seeds: seeds.to_vec(),
            sizes: sizes.iter().map(|&(width, height)| pb::ImageSize { width, height }).collect(),
        }),
        ..Default::default()
    }
}

/// Every RPC × {no token, wrong role, right role}.
#[tokio::test]
async fn every_rpc_checks_the_token_and_its_role() {
    let h = Harness::start().await;
    let (sub, adm, wrk) = (h.submit_token.clone(), h.admin_token.clone(), h.worker_token.clone());
    async fn call(h: &Harness, rpc: &str, token: Option<&str>) -> Code {
        let r = h.render_as(token);
        let a = h.admin_as(token);
        let w = h.worker_as(token);
        macro_rules! code {
            ($fut:expr) => {
                match $fut.await {
                    Ok(_) => Code::Ok,
                    Err(status) => status.code(),
                }
            };
        }
        match rpc {
            "SubmitBatch" => code!(r.clone().submit_batch(pb::SubmitBatchRequest::default())),
            "GetBatch" => code!(r.clone().get_batch(pb::GetBatchRequest::default())),
            "GetJob" => code!(r.clone().get_job(pb::GetJobRequest::default())),
            "ListJobs" => code!(r.clone().list_jobs(pb::ListJobsRequest::default())),
            "WatchBatch" => code!(r.clone().watch_batch(pb::WatchBatchRequest::default())),
            "CancelJobs" => code!(r.clone().cancel_jobs(pb::CancelJobsRequest::default())),
            "GetResult" => code!(r.clone().get_result(pb::GetResultRequest::default())),
            "PauseQueue" => code!(a.clone().pause_queue(pb::PauseQueueRequest::default())),
            "ResumeQueue" => code!(a.clone().resume_queue(pb::ResumeQueueRequest::default())),
            "SetPriority" => code!(a.clone().set_priority(pb::SetPriorityRequest::default())),
            "RetryJobs" => code!(a.clone().retry_jobs(pb::RetryJobsRequest::default())),
            "RequeueJobs" => code!(a.clone().requeue_jobs(pb::RequeueJobsRequest::default())),
            "PurgeJobs" => code!(a.clone().purge_jobs(pb::PurgeJobsRequest::default())),
            "GetQueueStats" => code!(a.clone().get_queue_stats(pb::GetQueueStatsRequest::default())),
            "ListWorkers" => code!(a.clone().list_workers(pb::ListWorkersRequest::default())),
            "DrainWorker" => code!(a.clone().drain_worker(pb::WorkerRef::default())),
            "CordonWorker" => code!(a.clone().cordon_worker(pb::WorkerRef::default())),
            "UncordonWorker" => code!(a.clone().uncordon_worker(pb::WorkerRef::default())),
            "RegisterWorker" => code!(w.clone().register_worker(pb::RegisterWorkerRequest::default())),
            "Heartbeat" => code!(w.clone().heartbeat(pb::HeartbeatRequest::default())),
            "StartJob" => code!(w.clone().start_job(pb::StartJobRequest::default())),
            "ReportProgress" => code!(w.clone().report_progress(pb::ReportProgressRequest::default())),
            "CompleteJob" => code!(w.clone().complete_job(pb::CompleteJobRequest::default())),
            "FailJob" => code!(w.clone().fail_job(pb::FailJobRequest::default())),
            "DeregisterWorker" => code!(w.clone().deregister_worker(pb::DeregisterWorkerRequest::default())),
            other => panic!("unknown rpc {other}"),
        }
    }
    let render = ["SubmitBatch", "GetBatch", "GetJob", "ListJobs", "WatchBatch", "CancelJobs", "GetResult"];
    let admin = [
        "PauseQueue",
        "ResumeQueue",
        "SetPriority",
        "RetryJobs",
        "RequeueJobs",
        "PurgeJobs",
        "GetQueueStats",
        "ListWorkers",
        "DrainWorker",
        "CordonWorker",
        "UncordonWorker",
    ];
    let worker = ["RegisterWorker", "Heartbeat", "StartJob", "ReportProgress", "CompleteJob", "FailJob", "DeregisterWorker"];
    let table: Vec<(&str, &str, &str)> = render
        .iter()
        .map(|rpc| (*rpc, wrk.as_str(), sub.as_str()))
        .chain(admin.iter().map(|rpc| (*rpc, sub.as_str(), adm.as_str())))
        .chain(worker.iter().map(|rpc| (*rpc, adm.as_str(), wrk.as_str())))
        .collect();
    assert_eq!(table.len(), 25);
    for (rpc, wrong, right) in table {
        assert_eq!(call(&h, rpc, None).await, Code::Unauthenticated, "{rpc} without a token");
        assert_eq!(call(&h, rpc, Some("fft_not_a_token")).await, Code::Unauthenticated, "{rpc} with an unknown token");
        assert_eq!(call(&h, rpc, Some(wrong)).await, Code::PermissionDenied, "{rpc} with the wrong role");
        let allowed = call(&h, rpc, Some(right)).await;
        assert!(!matches!(allowed, Code::Unauthenticated | Code::PermissionDenied), "{rpc} with the right role got {allowed:?}");
    }
    // Admins may use the render API too.
    let code = call(&h, "ListJobs", Some(&adm)).await;
    assert_eq!(code, Code::Ok);
    h.stop().await;
}

/// At least 30 distinct bad submissions, each refused with INVALID_ARGUMENT
/// naming the field, and nothing written.
#[tokio::test]
async fn bad_submissions_are_refused_field_by_field_and_store_nothing() {
    let h = Harness::start_with(|c| c.limits.max_batch_jobs = 20_000).await;
    let mut labels33 = BTreeMap::new();
    for i in 0..33 {
        labels33.insert(format!("k{i}"), "v".to_string());
    }
    let cases: Vec<(&str, pb::SubmitBatchRequest, &str)> = vec![
        ("width not /16", job_with(|j| j.width = 1000), "jobs[0].width: 1000 is not a multiple of 16"),
        ("height over limit", job_with(|j| j.height = 4096), "jobs[0].height: 4096 exceeds model sd3's limit of 2048 pixels"),
        ("width under minimum", job_with(|j| j.width = 32), "jobs[0].width: 32 is below the minimum of 64"),
        ("steps over max", job_with(|j| j.steps = 201), "jobs[0].steps: 201 is outside 1..=200"),
        ("guidance NaN", job_with(|j| j.guidance_scale = Some(f32::NAN)), "jobs[0].guidance_scale: NaN is not a finite number"),
        ("guidance inf", job_with(|j| j.guidance_scale = Some(f32::INFINITY)), "jobs[0].guidance_scale: inf is not a finite number"),
        ("guidance negative", job_with(|j| j.guidance_scale = Some(-1.0)), "jobs[0].guidance_scale: -1 is outside [0, 30]"),
        ("guidance too high", job_with(|j| j.guidance_scale = Some(31.0)), "jobs[0].guidance_scale: 31 is outside [0, 30]"),
        ("shift zero", job_with(|j| j.shift = Some(0.0)), "jobs[0].shift: 0 is outside (0, 100]"),
        ("shift NaN", job_with(|j| j.shift = Some(f64::NAN)), "jobs[0].shift: NaN is outside (0, 100]"),
        ("shift huge", job_with(|j| j.shift = Some(1000.0)), "jobs[0].shift: 1000 is outside (0, 100]"),
        ("seed too large", job_with(|j| j.seed = Some(u64::MAX)), "jobs[0].seed: 18446744073709551615 is above the maximum"),
        ("priority too high", job_with(|j| j.priority = 5000), "jobs[0].priority: 5000 is outside -1000..=1000"),
        ("too many attempts", job_with(|j| j.max_attempts = 11), "jobs[0].max_attempts: 11 is outside 1..=10"),
        ("no model", job_with(|j| j.model.clear()), "jobs[0].model: required"),
        ("unknown model", job_with(|j| j.model = "sdxl".into()), "jobs[0].model: unknown model `sdxl` (served: sd3, tiny)"),
        ("empty prompt", job_with(|j| j.prompt.clear()), "jobs[0].prompt: must not be empty"),
        ("blank prompt", job_with(|j| j.prompt = "   ".into()), "jobs[0].prompt: must not be empty"),
        ("long prompt", job_with(|j| j.prompt = "x".repeat(2001)), "jobs[0].prompt: 2001 characters, more than the limit of 2000"),
        ("NUL in prompt", job_with(|j| j.prompt = "a\0b".into()), "jobs[0].prompt: must not contain NUL characters"),
        ("long negative", job_with(|j| j.negative_prompt = "n".repeat(2001)), "jobs[0].negative_prompt: 2001 characters"),
        ("unknown encoder set", job_with(|j| j.text_encoders = 7), "jobs[0].text_encoders: 7 is not a text encoder set"),
        (
            "encoder set the model refuses",
            job_with(|j| {
                j.model = "tiny".into();
                j.text_encoders = pb::TextEncoderSet::All as i32;
            }),
            "jobs[0].text_encoders: model tiny does not allow `all`",
        ),
        (
            "label key",
            job_with(|j| {
                j.labels.insert("Team".into(), "x".into());
            }),
            "jobs[0].labels[\"Team\"]: label keys are",
        ),
        ("33 labels", job_with(|j| j.labels = labels33.clone()), "jobs[0].labels: 33 labels, more than the limit of 32"),
        (
            "label value",
            job_with(|j| {
                j.labels.insert("k".into(), "v".repeat(300));
            }),
            "jobs[0].labels[\"k\"]: label values",
        ),
        ("second job bad", jobs(vec![ok_job(), pb::JobSpec { width: 100, ..ok_job() }]), "jobs[1].width: 100 is not a multiple of 16"),
        ("no jobs", pb::SubmitBatchRequest::default(), "jobs: a batch needs at least one job"),
        (
            "jobs and grid",
            pb::SubmitBatchRequest { grid: grid(&["a"], &[], &[], |_| {}).grid, ..jobs(vec![ok_job()]) },
            "grid: give jobs or a grid, not both",
        ),
        ("grid without prompts", grid(&[], &[1], &[], |_| {}), "grid.prompts: a grid needs at least one prompt"),
        (
            "grid without base",
            pb::SubmitBatchRequest { grid: Some(pb::JobGrid { prompts: vec!["a".into()], ..Default::default() }), ..Default::default() },
            "grid.base: required",
        ),
        (
            "grid too big",
            grid(&["p"; 200], &(0..101).collect::<Vec<_>>(), &[], |_| {}),
            "grid: expands to 20200 jobs, more than the limit of 20000",
        ),
        ("grid size", grid(&["p"], &[], &[(512, 512), (512, 500)], |_| {}), "grid.sizes[1].height: 500 is not a multiple of 16"),
        ("grid zero size", grid(&["p"], &[], &[(0, 512)], |_| {}), "grid.sizes[0]: width and height must both be set"),
        ("grid base prompt", grid(&["p"], &[], &[], |b| b.prompt = "x".into()), "grid.base.prompt: must be empty"),
        ("grid base seed", grid(&["p"], &[], &[], |b| b.seed = Some(1)), "grid.base.seed: must be unset"),
        ("grid seed", grid(&["p"], &[1 << 63], &[], |_| {}), "grid.seeds[0]: 9223372036854775808 is above the maximum"),
        ("grid empty prompt", grid(&["p", ""], &[], &[], |_| {}), "grid.prompts[1]: must not be empty"),
        ("grid base steps", grid(&["p", "q"], &[], &[], |b| b.steps = 500), "grid.base.steps: 500 is outside 1..=200"),
        ("grid unknown model", grid(&["p"], &[], &[], |b| b.model = "nope".into()), "grid.base.model: unknown model `nope`"),
        (
            "long idempotency key",
            pb::SubmitBatchRequest { idempotency_key: "k".repeat(129), ..jobs(vec![ok_job()]) },
            "idempotency_key: longer than 128 characters",
        ),
        (
            "batch label",
            pb::SubmitBatchRequest { labels: BTreeMap::from([("Bad Key".into(), "v".into())]), ..jobs(vec![ok_job()]) },
            "labels[\"Bad Key\"]: label keys are",
        ),
        ("too many jobs", jobs(vec![ok_job(); 20_001]), "jobs: 20001 jobs, more than the limit of 20000"),
    ];
    assert!(cases.len() >= 30, "{} cases", cases.len());
    let mut seen = HashSet::new();
    let before = h.rows().await;
    let mut render = h.render();
    for (name, request, expected) in cases {
        assert!(seen.insert(name), "duplicate case {name}");
        let status = render.submit_batch(request).await.expect_err(name);
        assert_eq!(status.code(), Code::InvalidArgument, "{name}: {status:?}");
        assert!(status.message().starts_with(expected), "{name}: got `{}`, expected `{expected}`", status.message());
        assert_eq!(h.rows().await, before, "{name} wrote rows");
    }
    h.stop().await;
}

/// Bad ids, pages, selectors and worker reports on the other RPCs.
#[tokio::test]
async fn bad_arguments_on_other_rpcs_name_the_field() {
    let h = Harness::start().await;
    let (mut r, mut a, mut w) = (h.render(), h.admin(), h.worker());
    let expect = |result: Result<(), tonic::Status>, field: &str| {
        let status = result.expect_err(field);
        assert_eq!(status.code(), Code::InvalidArgument, "{field}: {status:?}");
        assert!(status.message().starts_with(field), "{field}: got `{}`", status.message());
    };
    expect(r.get_job(pb::GetJobRequest { job_id: "nope".into() }).await.map(drop), "job_id: `nope` is not a UUID");
    expect(r.get_batch(pb::GetBatchRequest::default()).await.map(drop), "batch_id: required");
    expect(r.list_jobs(pb::ListJobsRequest { page_size: 5000, ..Default::default() }).await.map(drop), "page_size: 5000");
    expect(r.list_jobs(pb::ListJobsRequest { states: vec![99], ..Default::default() }).await.map(drop), "states[0]: 99 is not a job state");
    expect(
        r.list_jobs(pb::ListJobsRequest { label: "novalue".into(), ..Default::default() }).await.map(drop),
        "label: `novalue` is not key=value",
    );
    expect(r.list_jobs(pb::ListJobsRequest { page_token: "zz".into(), ..Default::default() }).await.map(drop), "page_token:");
    expect(
        r.cancel_jobs(pb::CancelJobsRequest { job_ids: vec!["x".into()], batch_id: "y".into(), ..Default::default() }).await.map(drop),
        "request: give job ids or a batch id, not both",
    );
    expect(
        a.set_priority(pb::SetPriorityRequest {
            jobs: Some(pb::JobSelector { batch_id: uuid::Uuid::nil().to_string(), ..Default::default() }),
            priority: 2000,
        })
        .await
        .map(drop),
        "priority: 2000 is outside",
    );
    expect(
        a.pause_queue(pb::PauseQueueRequest { model: "nope".into(), ..Default::default() }).await.map(drop),
        "model: unknown model `nope`",
    );
    expect(a.purge_jobs(pb::PurgeJobsRequest::default()).await.map(drop), "jobs: give a job selector or older_than_seconds");
    expect(
        w.register_worker(pb::RegisterWorkerRequest { name: "w".into(), models: vec!["sd3".into()], capacity: 0, ..Default::default() })
            .await
            .map(drop),
        "capacity: 0 is outside 1..=64",
    );
    expect(
        w.register_worker(pb::RegisterWorkerRequest {
            name: "w".into(),
            models: vec!["sd3".into(), "x".into()],
            capacity: 1,
            ..Default::default()
        })
        .await
        .map(drop),
        "models[1]: unknown model `x`",
    );
    expect(
        w.register_worker(pb::RegisterWorkerRequest {
            name: "w".into(),
            models: vec!["sd3".into()],
            model_hashes: [("sd3".to_owned(), "5D".repeat(32))].into(),
            capacity: 1,
            ..Default::default()
        })
        .await
        .map(drop),
        "model_hashes[sd3]: must be 64 lower-case hex digits",
    );
    expect(
        w.register_worker(pb::RegisterWorkerRequest {
            name: "w".into(),
            models: vec!["sd3".into()],
            model_hashes: [("other".to_owned(), "5d".repeat(32))].into(),
            capacity: 1,
            ..Default::default()
        })
        .await
        .map(drop),
        "model_hashes[other]: names a model that is not in `models`",
    );
    let placed = |model: &str, parallel: &str, units: &[&str], max_batch: u32| pb::RegisterWorkerRequest {
        name: "w".into(),
        models: vec!["sd3".into()],
        placements: [(
            model.to_owned(),
            pb::ModelPlacement {
                parallel: parallel.into(),
                units: units.iter().map(|u| u.to_string()).collect(),
                encoders: "same".into(),
                max_batch,
            },
        )]
        .into(),
        capacity: 1,
        ..Default::default()
    };
    for (request, said) in [
        (placed("other", "cfg", &["cuda:0+cuda:1"], 1), "placements[other]: names a model that is not in `models`"),
        (placed("sd3", "ring", &["cuda:0"], 1), "placements[sd3].parallel: `ring` is not `replicate`, `cfg` or `pipeline`"),
        (placed("sd3", "cfg", &[], 1), "placements[sd3].units: must list 1 to 64 units"),
        (placed("sd3", "cfg", &["cuda:0", " "], 1), "placements[sd3].units[1]: must be 1 to 256 characters"),
        (placed("sd3", "cfg", &["cuda:0"], 0), "placements[sd3].max_batch: 0 is outside 1..=16"),
    ] {
        expect(w.register_worker(request).await.map(drop), said);
    }
    let id = uuid::Uuid::now_v7().to_string();
    expect(
        w.report_progress(pb::ReportProgressRequest { worker_id: id.clone(), job_id: id.clone(), attempt: 1, step: 5, total_steps: 4 })
            .await
            .map(drop),
        "step: 5 is beyond total_steps 4",
    );
    let result = |key: &str, sha: &str| pb::JobResult {
        key: key.into(),
        sha256: sha.into(),
        size_bytes: 1,
        content_type: "image/png".into(),
        ..Default::default()
    };
    expect(
        w.complete_job(pb::CompleteJobRequest {
            worker_id: id.clone(),
            job_id: id.clone(),
            attempt: 1,
            result: Some(result("../etc/passwd", &"a".repeat(64))),
            gpu_seconds: 0.0,
        })
        .await
        .map(drop),
        "result.key: `../etc/passwd` must be a relative path",
    );
    expect(
        w.complete_job(pb::CompleteJobRequest {
            worker_id: id.clone(),
            job_id: id.clone(),
            attempt: 1,
            result: Some(result("a.png", "xyz")),
            gpu_seconds: 0.0,
        })
        .await
        .map(drop),
        "result.sha256: must be 64 lower-case hex digits",
    );
    expect(
        w.complete_job(pb::CompleteJobRequest {
            worker_id: id.clone(),
            job_id: id.clone(),
            attempt: 1,
            result: Some(pb::JobResult { model_hash: "abc".into(), ..result("a.png", &"a".repeat(64)) }),
            gpu_seconds: 0.0,
        })
        .await
        .map(drop),
        "result.model_hash: must be 64 lower-case hex digits",
    );
    expect(
        w.complete_job(pb::CompleteJobRequest {
            worker_id: id.clone(),
            job_id: id.clone(),
            attempt: 1,
            result: Some(pb::JobResult { content_type: "text/html".into(), ..result("a.png", &"a".repeat(64)) }),
            gpu_seconds: 0.0,
        })
        .await
        .map(drop),
        "result.content_type: `text/html` is not an image type this farm serves (image/png, image/jpeg, image/webp)",
    );
    expect(
        w.fail_job(pb::FailJobRequest { worker_id: id.clone(), job_id: id, attempt: 0, ..Default::default() }).await.map(drop),
        "attempt: required",
    );
    h.stop().await;
}

#[tokio::test]
async fn idempotent_resubmission_returns_the_first_batch() {
    let h = Harness::start().await;
    let mut r = h.render();
    let req = pb::SubmitBatchRequest { idempotency_key: "nightly-42".into(), ..grid(&["a", "b"], &[], &[], |_| {}) };
    let first = r.submit_batch(req.clone()).await.unwrap().into_inner();
    let again = r.submit_batch(req.clone()).await.unwrap().into_inner();
    assert!(first.created && !again.created);
    assert_eq!(first.batch.unwrap().id, again.batch.unwrap().id);
    let mut other = req;
    other.grid.as_mut().unwrap().prompts.push("c".into());
    let conflict = r.submit_batch(other).await.unwrap_err();
    assert_eq!(conflict.code(), Code::AlreadyExists);
    assert_eq!(h.rows().await.1, 2);
    h.stop().await;
}

/// How the test worker serves `sd3`.
fn placement() -> pb::ModelPlacement {
    pb::ModelPlacement { parallel: "replicate".into(), units: vec!["cuda:0".into()], encoders: "cpu".into(), max_batch: 2 }
}

async fn register(w: &mut flowfarm_testkit::Worker) -> String {
    w.register_worker(pb::RegisterWorkerRequest {
        name: "gpu-box-1".into(),
        hostname: "gpu-box-1".into(),
        devices: vec![pb::Device { name: "cuda:0".into(), memory_bytes: 80 << 30, ..Default::default() }],
        models: vec!["sd3".into()],
        model_hashes: [("sd3".to_owned(), "5d".repeat(32))].into(),
        placements: [("sd3".to_owned(), placement())].into(),
        text_encoder_sets: vec![pb::TextEncoderSet::All as i32],
        capacity: 2,
        version: "test".into(),
    })
    .await
    .unwrap()
    .into_inner()
    .worker_id
}

/// Worker RPCs without a daemon: start → progress → complete; the result
/// streams back; watchers see progress and transitions.
#[tokio::test]
async fn worker_protocol_runs_a_job_to_success_and_watchers_see_it() {
    let h = Harness::start().await;
    let (mut r, mut w) = (h.render(), h.worker());
    let batch = r.submit_batch(job_with(|j| j.steps = 4)).await.unwrap().into_inner().batch.unwrap();
    let mut watch = r.watch_batch(pb::WatchBatchRequest { batch_id: batch.id.clone(), ..Default::default() }).await.unwrap().into_inner();
    let first = watch.next().await.unwrap().unwrap();
    assert!(matches!(first.event, Some(pb::watch_batch_event::Event::Snapshot(_))));

    let worker_id = register(&mut w).await;
    let job = h.db.store.dispatch_jobs("sd3", flowfarm_core::TextEncoderSet::All, 10, "test").await.unwrap().remove(0);
    let start = w.start_job(pb::StartJobRequest { worker_id: worker_id.clone(), job_id: job.id.to_string() }).await.unwrap().into_inner();
    assert_eq!(start.attempt, 1);
    let spec = start.job.unwrap().spec.unwrap();
    assert_eq!((spec.steps, spec.seed.is_some(), spec.shift), (4, true, Some(3.0)), "the worker gets the resolved spec");
    for step in 1..=4 {
        w.report_progress(pb::ReportProgressRequest {
            worker_id: worker_id.clone(),
            job_id: job.id.to_string(),
            attempt: 1,
            step,
            total_steps: 4,
        })
        .await
        .unwrap();
    }
    let png = b"\x89PNG\r\n\x1a\nnot really a png, but bytes".repeat(5000);
    std::fs::write(h.results_dir.path().join("out.png"), &png).unwrap();
    let sha = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(&png))
    };
    let result = pb::JobResult {
        key: "out.png".into(),
        sha256: sha.clone(),
        size_bytes: png.len() as u64,
        content_type: "image/png".into(),
        model_hash: "5d".repeat(32),
    };
    let complete = pb::CompleteJobRequest {
        worker_id: worker_id.clone(),
        job_id: job.id.to_string(),
        attempt: 1,
        result: Some(result),
        gpu_seconds: 1.5,
    };
    // A heartbeat's delta is not counted: the completion's 1.5 s are the attempt's.
    // Its devices, with their counters, are what ListWorkers shows.
    let device = pb::Device { name: "cuda:0".into(), memory_bytes: 80 << 30, busy_slots: 1, images_done: 3, busy_seconds: 4.5 };
    let beat =
        pb::HeartbeatRequest { worker_id: worker_id.clone(), gpu_seconds_delta: 5.0, running: vec![], devices: vec![device.clone()] };
    w.heartbeat(beat).await.unwrap();
    w.complete_job(complete.clone()).await.unwrap();
    w.complete_job(complete).await.expect("a repeated completion is a no-op");

    let mut progress = Vec::new();
    let mut transitions = Vec::new();
    let mut last_snapshot = None;
    while let Some(event) = tokio::time::timeout(Duration::from_secs(10), watch.next()).await.expect("watch stalled") {
        match event.unwrap().event.unwrap() {
            pb::watch_batch_event::Event::Progress(p) => progress.push(p.step),
            pb::watch_batch_event::Event::StateChange(e) => transitions.push(e.to_state),
            pb::watch_batch_event::Event::Snapshot(b) => last_snapshot = Some(b),
        }
    }
    assert_eq!(progress, vec![1, 2, 3, 4]);
    let s = |state: pb::JobState| state as i32;
    assert_eq!(transitions, vec![s(pb::JobState::Dispatched), s(pb::JobState::Running), s(pb::JobState::Succeeded)]);
    assert_eq!(last_snapshot.unwrap().counts.unwrap().succeeded, 1);

    let mut stream = r.get_result(pb::GetResultRequest { job_id: job.id.to_string() }).await.unwrap().into_inner();
    let mut bytes = Vec::new();
    let mut chunks = 0;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.unwrap();
        if chunks == 0 {
            assert_eq!((chunk.content_type.as_str(), chunk.total_size), ("image/png", png.len() as u64));
        }
        chunks += 1;
        bytes.extend(chunk.data);
    }
    assert_eq!(bytes, png);
    assert!(chunks > 1, "streamed in chunks");
    let workers = h.admin().list_workers(pb::ListWorkersRequest::default()).await.unwrap().into_inner().workers;
    assert_eq!((workers[0].images_done, workers[0].gpu_seconds), (1, 1.5));
    assert_eq!(workers[0].devices, vec![device], "the devices as the last heartbeat reported them");
    assert_eq!(workers[0].model_hashes.get("sd3"), Some(&"5d".repeat(32)), "the weights it registered with");
    assert_eq!(workers[0].placements.get("sd3"), Some(&placement()), "how it serves the model, as registered");
    let stored = r.get_job(pb::GetJobRequest { job_id: job.id.to_string() }).await.unwrap().into_inner();
    assert_eq!(stored.result.unwrap().model_hash, "5d".repeat(32), "the weights that rendered it");
    assert_eq!(stored.gpu_seconds, 1.5);
    let b = r.get_batch(pb::GetBatchRequest { batch_id: batch.id.clone() }).await.unwrap().into_inner();
    assert_eq!(b.gpu_seconds, 1.5);
    let stats = h.admin().get_queue_stats(pb::GetQueueStatsRequest::default()).await.unwrap().into_inner();
    let usage: Vec<(String, f64)> = stats.submitters.into_iter().map(|u| (u.submitter, u.gpu_seconds)).collect();
    assert_eq!(usage, vec![("sub".to_owned(), 1.5)], "per submitter (the harness's submit token is `sub`)");
    h.stop().await;
}

/// StartJobs and CompleteJobs: one outcome per job in order, a refused job
/// does not refuse the others, a bad request is refused whole and records
/// nothing, and the jobs end as the single calls would leave them.
#[tokio::test]
async fn batched_starts_and_completions_answer_job_by_job() {
    let h = Harness::start().await;
    let (mut r, mut w) = (h.render(), h.worker());
    let batch = r.submit_batch(grid(&["a", "b", "c", "d"], &[1], &[], |_| {})).await.unwrap().into_inner().batch.unwrap();
    let worker_id = register(&mut w).await;
    let dispatched = h.db.store.dispatch_jobs("sd3", flowfarm_core::TextEncoderSet::All, 3, "test").await.unwrap();
    assert_eq!(dispatched.len(), 3);
    let queued =
        h.db.store
            .list_jobs(&flowfarm_store::JobFilter { batch_id: Some(batch.id.parse().unwrap()), ..Default::default() }, None, 10)
            .await
            .unwrap()
            .into_iter()
            .find(|j| !dispatched.iter().any(|d| d.id == j.id))
            .expect("one job left queued");
    let ids: Vec<String> = dispatched.iter().map(|j| j.id.to_string()).collect();

    // Refused whole, before anything is recorded.
    let request = |job_ids: Vec<String>| pb::StartJobsRequest { worker_id: worker_id.clone(), job_ids };
    for (bad, field) in [
        (vec![], "job_ids: 0 entries"),
        (vec![ids[0].clone(), "nope".into()], "job_ids[1]"),
        (vec![ids[0].clone(), ids[0].clone()], "job_ids[1]: job"),
        (vec![ids[0].clone(); 257], "job_ids: 257 entries"),
    ] {
        let err = w.start_jobs(request(bad)).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        assert!(err.message().starts_with(field), "{}", err.message());
    }

    // The queued job (not dispatched) is refused; the three others start.
    let mut asked = ids.clone();
    asked.insert(1, queued.id.to_string());
    let outcomes = w.start_jobs(request(asked)).await.unwrap().into_inner().outcomes;
    assert_eq!(outcomes.len(), 4);
    let mut started = Vec::new();
    for (i, outcome) in outcomes.into_iter().enumerate() {
        match (i, outcome.outcome.unwrap()) {
            (1, pb::start_job_outcome::Outcome::Refused(r)) => {
                assert_eq!(r.code, Code::FailedPrecondition as i32, "{}", r.message);
            }
            (_, pb::start_job_outcome::Outcome::Started(s)) => started.push((s.job.unwrap().id, s.attempt)),
            (i, other) => panic!("outcome {i}: {other:?}"),
        }
    }
    assert_eq!(started.iter().map(|(id, _)| id.clone()).collect::<Vec<_>>(), ids, "outcomes keep the request's order");
    // Claimed again by the same worker (a retry after a lost answer): the
    // same claim comes back, and the job stays with its first start.
    let again = w.start_jobs(request(vec![ids[0].clone()])).await.unwrap().into_inner().outcomes;
    assert!(matches!(&again[0].outcome, Some(pb::start_job_outcome::Outcome::Started(s)) if s.attempt == started[0].1), "{again:?}");

    let done = |job_id: &str, attempt: u32, key: &str| pb::CompletedJob {
        job_id: job_id.into(),
        attempt,
        result: Some(pb::JobResult {
            key: key.into(),
            sha256: "a".repeat(64),
            size_bytes: 3,
            content_type: "image/png".into(),
            ..Default::default()
        }),
        gpu_seconds: 0.5,
    };
    let complete = |jobs: Vec<pb::CompletedJob>| pb::CompleteJobsRequest { worker_id: worker_id.clone(), jobs };
    // One bad entry refuses the whole call: nothing completes.
    let err = w.complete_jobs(complete(vec![done(&ids[0], 1, "a.png"), done(&ids[1], 1, "../escape.png")])).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().starts_with("jobs[1].result.key"), "{}", err.message());
    assert_eq!(h.db.store.get_job(dispatched[0].id).await.unwrap().state, flowfarm_core::JobState::Running);

    // A stale attempt is refused; the others complete; a repeat is a no-op.
    let outcomes = w
        .complete_jobs(complete(vec![done(&ids[0], 1, "a.png"), done(&ids[1], 2, "b.png"), done(&ids[2], 1, "c.png")]))
        .await
        .unwrap()
        .into_inner()
        .outcomes;
    let refused: Vec<Option<i32>> = outcomes.iter().map(|o| o.refused.as_ref().map(|r| r.code)).collect();
    assert_eq!(refused, vec![None, Some(Code::FailedPrecondition as i32), None]);
    let repeat = w.complete_jobs(complete(vec![done(&ids[0], 1, "a.png")])).await.unwrap().into_inner().outcomes;
    assert!(repeat[0].refused.is_none(), "a repeated completion is a no-op");
    let states: Vec<flowfarm_core::JobState> = futures::future::join_all(dispatched.iter().map(|j| h.db.store.get_job(j.id)))
        .await
        .into_iter()
        .map(|j| j.unwrap().state)
        .collect();
    use flowfarm_core::JobState::{Running, Succeeded};
    assert_eq!(states, vec![Succeeded, Running, Succeeded]);
    let workers = h.admin().list_workers(pb::ListWorkersRequest::default()).await.unwrap().into_inner().workers;
    assert_eq!((workers[0].images_done, workers[0].gpu_seconds), (2, 1.0), "each completion credited once");
    h.stop().await;
}

/// A worker's reports must carry the token it registered with: another
/// worker token cannot claim, report, fail or deregister for it.
#[tokio::test]
async fn a_worker_token_acts_only_for_the_workers_it_registered() {
    let h = Harness::start().await;
    let mut w = h.worker();
    let worker_id = register(&mut w).await;
    let (_, other_secret) =
        h.db.store.create_token(&flowfarm_store::NewToken::new("other-fleet", flowfarm_core::Role::Worker), rand::random()).await.unwrap();
    let mut other = h.worker_as(Some(&other_secret));
    h.render().submit_batch(job_with(|_| {})).await.unwrap();
    let job = h.db.store.dispatch_jobs("sd3", flowfarm_core::TextEncoderSet::All, 1, "test").await.unwrap().remove(0);
    let id = job.id.to_string();

    let denied = |r: Result<tonic::Response<_>, tonic::Status>, what: &str| {
        let err = r.map(|_: tonic::Response<()>| ()).unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied, "{what}: {err:?}");
        assert!(err.message().contains("registered with another token"), "{what}: {}", err.message());
    };
    let unit = |r: Result<tonic::Response<pb::StartJobsResponse>, tonic::Status>| r.map(|r| r.map(|_| ()));
    denied(unit(other.start_jobs(pb::StartJobsRequest { worker_id: worker_id.clone(), job_ids: vec![id.clone()] }).await), "StartJobs");
    let start = other.start_job(pb::StartJobRequest { worker_id: worker_id.clone(), job_id: id.clone() }).await;
    denied(start.map(|r| r.map(|_| ())), "StartJob");
    let beat = other.heartbeat(pb::HeartbeatRequest { worker_id: worker_id.clone(), ..Default::default() }).await;
    denied(beat.map(|r| r.map(|_| ())), "Heartbeat");
    let gone = other.deregister_worker(pb::DeregisterWorkerRequest { worker_id: worker_id.clone() }).await;
    denied(gone.map(|r| r.map(|_| ())), "DeregisterWorker");
    assert_eq!(h.db.store.get_job(job.id).await.unwrap().state, flowfarm_core::JobState::Dispatched, "nothing happened");

    // Its own token works; then the other token cannot report for the running job either.
    let started = w.start_job(pb::StartJobRequest { worker_id: worker_id.clone(), job_id: id.clone() }).await.unwrap().into_inner();
    let fail = other
        .fail_job(pb::FailJobRequest {
            worker_id: worker_id.clone(),
            job_id: id.clone(),
            attempt: started.attempt,
            error: "x".into(),
            ..Default::default()
        })
        .await;
    denied(fail.map(|r| r.map(|_| ())), "FailJob");
    let progress = other
        .report_progress(pb::ReportProgressRequest {
            worker_id: worker_id.clone(),
            job_id: id,
            attempt: started.attempt,
            step: 1,
            total_steps: 28,
        })
        .await;
    denied(progress.map(|r| r.map(|_| ())), "ReportProgress");
    assert_eq!(h.db.store.get_job(job.id).await.unwrap().state, flowfarm_core::JobState::Running);
    h.stop().await;
}

/// Lease expiry → queued with attempt + 1; the stale attempt's reports are
/// refused; the last attempt's failure makes the job dead.
#[tokio::test]
async fn leases_expire_stale_reports_are_refused_and_last_attempts_die() {
    let h = Harness::start_with(|c| {
        c.leases.lease_seconds = 2;
        c.leases.heartbeat_interval_seconds = 1;
        c.leases.reaper_interval_seconds = 0.2;
    })
    .await;
    let (mut r, mut w) = (h.render(), h.worker());
    r.submit_batch(job_with(|j| j.max_attempts = 2)).await.unwrap();
    let worker_id = register(&mut w).await;
    let job = h.db.store.dispatch_jobs("sd3", flowfarm_core::TextEncoderSet::All, 1, "test").await.unwrap().remove(0);
    let job_id = job.id.to_string();
    let start = pb::StartJobRequest { worker_id: worker_id.clone(), job_id: job_id.clone() };
    w.start_job(start.clone()).await.unwrap();

    // No heartbeat, no progress: the reaper takes the job back.
    let mut requeued = None;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let j = r.get_job(pb::GetJobRequest { job_id: job_id.clone() }).await.unwrap().into_inner();
        if j.state == pb::JobState::Queued as i32 {
            requeued = Some(j);
            break;
        }
    }
    let requeued = requeued.expect("lease never expired");
    assert_eq!(requeued.attempt, 2);

    let stale = w
        .report_progress(pb::ReportProgressRequest {
            worker_id: worker_id.clone(),
            job_id: job_id.clone(),
            attempt: 1,
            step: 1,
            total_steps: 28,
        })
        .await
        .unwrap_err();
    assert_eq!(stale.code(), Code::FailedPrecondition, "{stale:?}");
    assert!(stale.message().contains("attempt 1"), "{}", stale.message());

    h.db.store.dispatch_jobs("sd3", flowfarm_core::TextEncoderSet::All, 1, "test").await.unwrap();
    let second = w.start_job(start).await.unwrap().into_inner();
    assert_eq!(second.attempt, 2);
    // Heartbeats keep the lease alive past its length.
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(1000)).await;
        let beat = w
            .heartbeat(pb::HeartbeatRequest {
                worker_id: worker_id.clone(),
                gpu_seconds_delta: 1.0,
                running: vec![pb::RunningJob { job_id: job_id.clone(), attempt: 2 }],
                devices: vec![],
            })
            .await
            .unwrap()
            .into_inner();
        assert!(beat.revoked_job_ids.is_empty());
    }
    let failed = w
        .fail_job(pb::FailJobRequest {
            worker_id,
            job_id: job_id.clone(),
            attempt: 2,
            error: "CUDA error: device lost".into(),
            retryable: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(failed.state, pb::JobState::Dead as i32);
    let dead = r.get_job(pb::GetJobRequest { job_id }).await.unwrap().into_inner();
    assert_eq!((dead.state, dead.error.as_str()), (pb::JobState::Dead as i32, "CUDA error: device lost"));
    h.stop().await;
}

/// A 10,000-job grid: ListJobs pages through all of it, cancelling the batch
/// moves every queued job with one event each.
#[tokio::test]
async fn ten_thousand_jobs_page_and_cancel_with_one_event_each() {
    let h = Harness::start().await;
    let mut r = h.render();
    let prompts: Vec<String> = (0..100).map(|i| format!("prompt {i}")).collect();
    let prompts: Vec<&str> = prompts.iter().map(String::as_str).collect();
    let seeds: Vec<u64> = (0..100).collect();
    let batch = r.submit_batch(grid(&prompts, &seeds, &[], |_| {})).await.unwrap().into_inner().batch.unwrap();
    assert_eq!(batch.total_jobs, 10_000);

    let mut ids = HashSet::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let page = r
            .list_jobs(pb::ListJobsRequest { batch_id: batch.id.clone(), page_size: 1000, page_token: token, ..Default::default() })
            .await
            .unwrap()
            .into_inner();
        pages += 1;
        ids.extend(page.jobs.into_iter().map(|j| j.id));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!((ids.len(), pages), (10_000, 10));

    let before_events = h.rows().await.2;
    let cancelled = r
        .cancel_jobs(pb::CancelJobsRequest { batch_id: batch.id.clone(), reason: "changed my mind".into(), ..Default::default() })
        .await
        .unwrap()
        .into_inner()
        .cancelled;
    assert_eq!(cancelled, 10_000);
    assert_eq!(h.rows().await.2 - before_events, 10_000, "one event per job");
    let per_job: i64 =
        sqlx::query_scalar("SELECT count(DISTINCT job_id) FROM job_events WHERE to_state = 'cancelled' AND reason = 'changed my mind'")
            .fetch_one(h.db.store.pool())
            .await
            .unwrap();
    assert_eq!(per_job, 10_000);
    let b = r.get_batch(pb::GetBatchRequest { batch_id: batch.id }).await.unwrap().into_inner();
    assert_eq!(b.counts.unwrap().cancelled, 10_000);
    h.stop().await;
}

#[tokio::test]
async fn health_is_serving_and_reflection_lists_the_services() {
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::HealthCheckRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::ServerReflectionRequest;

    let h = Harness::start().await;
    let mut health = HealthClient::new(h.channel.clone());
    for service in ["", "flowfarm.v1.RenderService", "flowfarm.v1.AdminService", "flowfarm.v1.WorkerService"] {
        let status = health.check(HealthCheckRequest { service: service.into() }).await.unwrap().into_inner().status;
        assert_eq!(status, tonic_health::pb::health_check_response::ServingStatus::Serving as i32, "{service:?}");
    }
    let mut reflection = ServerReflectionClient::new(h.channel.clone());
    let request = ServerReflectionRequest { host: String::new(), message_request: Some(MessageRequest::ListServices(String::new())) };
    let mut responses = reflection.server_reflection_info(tokio_stream::iter(vec![request])).await.unwrap().into_inner();
    let response = responses.next().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else { panic!("no service list") };
    let names: HashSet<String> = list.service.into_iter().map(|s| s.name).collect();
    for service in ["flowfarm.v1.RenderService", "flowfarm.v1.AdminService", "flowfarm.v1.WorkerService"] {
        assert!(names.contains(service), "{service} missing from {names:?}");
    }
    h.stop().await;
}

#[tokio::test]
async fn operators_pause_reprioritise_requeue_and_steer_workers() {
    let h = Harness::start().await;
    let (mut r, mut a, mut w) = (h.render(), h.admin(), h.worker());
    let batch = r.submit_batch(grid(&["a", "b", "c"], &[], &[], |_| {})).await.unwrap().into_inner().batch.unwrap();
    let paused = a.pause_queue(pb::PauseQueueRequest { model: "sd3".into(), reason: "driver update".into() }).await.unwrap().into_inner();
    assert!(paused.paused);
    assert_eq!(paused.updated_by, "admin:adm");
    assert!(
        h.db.store.dispatch_jobs("sd3", flowfarm_core::TextEncoderSet::All, 10, "t").await.unwrap().is_empty(),
        "a paused model dispatches nothing"
    );
    let stats = a.get_queue_stats(pb::GetQueueStatsRequest::default()).await.unwrap().into_inner();
    assert!(stats.models[0].paused);
    assert_eq!(stats.total.unwrap().queued, 3);
    a.resume_queue(pb::ResumeQueueRequest { model: "sd3".into() }).await.unwrap();

    let page = r.list_jobs(pb::ListJobsRequest { batch_id: batch.id.clone(), ..Default::default() }).await.unwrap().into_inner();
    let last = page.jobs[2].id.clone();
    let updated = a
        .set_priority(pb::SetPriorityRequest {
            jobs: Some(pb::JobSelector { job_ids: vec![last.clone()], ..Default::default() }),
            priority: 100,
        })
        .await
        .unwrap()
        .into_inner()
        .updated;
    assert_eq!(updated, 1);
    let first = h.db.store.dispatch_jobs("sd3", flowfarm_core::TextEncoderSet::All, 1, "t").await.unwrap().remove(0);
    assert_eq!(first.id.to_string(), last);

    let worker_id = register(&mut w).await;
    w.start_job(pb::StartJobRequest { worker_id: worker_id.clone(), job_id: last.clone() }).await.unwrap();
    let requeued = a
        .requeue_jobs(pb::RequeueJobsRequest {
            jobs: Some(pb::JobSelector { batch_id: batch.id.clone(), ..Default::default() }),
            reason: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .updated;
    assert_eq!(requeued, 1, "only the running job is requeued");
    let beat = w
        .heartbeat(pb::HeartbeatRequest {
            worker_id: worker_id.clone(),
            gpu_seconds_delta: 0.0,
            running: vec![pb::RunningJob { job_id: last.clone(), attempt: 1 }],
            devices: vec![],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(beat.revoked_job_ids, vec![last.clone()], "the worker learns it lost the job");

    let cordoned = a.cordon_worker(pb::WorkerRef { worker_id: worker_id.clone() }).await.unwrap().into_inner();
    assert_eq!(cordoned.state, pb::WorkerState::Cordoned as i32);
    let next = h.db.store.dispatch_jobs("sd3", flowfarm_core::TextEncoderSet::All, 1, "t").await.unwrap().remove(0);
    let refused = w.start_job(pb::StartJobRequest { worker_id: worker_id.clone(), job_id: next.id.to_string() }).await.unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition);
    a.uncordon_worker(pb::WorkerRef { worker_id: worker_id.clone() }).await.unwrap();
    let drained = a.drain_worker(pb::WorkerRef { worker_id: worker_id.clone() }).await.unwrap().into_inner();
    assert_eq!(drained.state, pb::WorkerState::Draining as i32);
    let beat = w.heartbeat(pb::HeartbeatRequest { worker_id, ..Default::default() }).await.unwrap().into_inner();
    assert_eq!(beat.state, pb::WorkerState::Draining as i32, "heartbeats tell the worker to drain");

    let cancelled = r.cancel_jobs(pb::CancelJobsRequest { batch_id: batch.id.clone(), ..Default::default() }).await.unwrap().into_inner();
    assert_eq!(cancelled.cancelled, 3);
    let retried = a
        .retry_jobs(pb::RetryJobsRequest {
            jobs: Some(pb::JobSelector { batch_id: batch.id.clone(), ..Default::default() }),
            reason: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(retried.updated, 3);
    r.cancel_jobs(pb::CancelJobsRequest { batch_id: batch.id.clone(), ..Default::default() }).await.unwrap();
    let purged = a
        .purge_jobs(pb::PurgeJobsRequest {
            jobs: Some(pb::JobSelector { batch_id: batch.id.clone(), ..Default::default() }),
            older_than_seconds: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(purged.updated, 3);
    assert_eq!(r.get_batch(pb::GetBatchRequest { batch_id: batch.id }).await.unwrap_err().code(), Code::NotFound);
    h.stop().await;
}

/// GetJobRequest with its string field as raw bytes, so a test can send what
/// no generated client would: a job id that is not UTF-8.
#[derive(Clone, PartialEq, prost::Message)]
struct RawGetJobRequest {
    #[prost(bytes = "vec", tag = "1")]
    job_id: Vec<u8>,
}

/// An undecodable request is the sender's fault: INVALID_ARGUMENT naming the
/// field, not INTERNAL (which invites a retry that can never succeed).
#[tokio::test]
async fn undecodable_requests_are_invalid_arguments() {
    let h = Harness::start().await;
    let mut grpc = tonic::client::Grpc::new(h.channel.clone());
    grpc.ready().await.unwrap();
    let mut request = tonic::Request::new(RawGetJobRequest { job_id: vec![0x66, 0xff, 0xfe, 0x6f] });
    request.metadata_mut().insert("authorization", format!("Bearer {}", h.submit_token).parse().unwrap());
    let path = tonic::codegen::http::uri::PathAndQuery::from_static("/flowfarm.v1.RenderService/GetJob");
    let codec = flowfarm_proto::codec::FlowfarmCodec::<RawGetJobRequest, pb::Job>::default();
    let status = grpc.unary(request, path, codec).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("GetJobRequest.job_id") && status.message().contains("UTF-8"), "{}", status.message());
    h.stop().await;
}

/// A batch's labels select its jobs in ListJobs, as their own labels do.
#[tokio::test]
async fn label_filters_see_the_batchs_labels_on_its_jobs() {
    let h = Harness::start().await;
    let mut r = h.render();
    let spec = |prompt: &str, labels: &[(&str, &str)]| pb::JobSpec {
        model: "sd3".into(),
        prompt: prompt.into(),
        labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        ..Default::default()
    };
    r.submit_batch(pb::SubmitBatchRequest {
        labels: [("shot".to_owned(), "s010".to_owned())].into(),
        jobs: vec![spec("a", &[]), spec("b", &[("take", "2")])],
        ..Default::default()
    })
    .await
    .unwrap();
    r.submit_batch(pb::SubmitBatchRequest { jobs: vec![spec("c", &[("shot", "s010")]), spec("d", &[])], ..Default::default() })
        .await
        .unwrap();
    let listed = |label: &str| {
        let mut r = r.clone();
        let label = label.to_owned();
        async move {
            let jobs = r.list_jobs(pb::ListJobsRequest { label, ..Default::default() }).await.unwrap().into_inner().jobs;
            let mut prompts: Vec<String> = jobs.into_iter().map(|j| j.spec.unwrap().prompt).collect();
            prompts.sort();
            prompts
        }
    };
    assert_eq!(listed("shot=s010").await, vec!["a", "b", "c"], "the batch's label and a job's own");
    assert_eq!(listed("take=2").await, vec!["b"]);
    assert!(listed("shot=s020").await.is_empty());
    h.stop().await;
}

/// A batch for a model and encoders no active worker serves is accepted,
/// with a warning per such model and set; GetQueueStats shows its jobs as
/// waiting for a worker.
#[tokio::test]
async fn submissions_no_worker_can_serve_are_warned_about() {
    let h = Harness::start().await;
    let (mut r, mut w, mut a) = (h.render(), h.worker(), h.admin());
    let spec = |set: pb::TextEncoderSet| pb::JobSpec {
        model: "sd3".into(),
        prompt: "a lighthouse".into(),
        text_encoders: set as i32,
        ..Default::default()
    };
    let submit = |specs: Vec<pb::JobSpec>| pb::SubmitBatchRequest { jobs: specs, ..Default::default() };
    let warned =
        r.submit_batch(submit(vec![spec(pb::TextEncoderSet::All), spec(pb::TextEncoderSet::ClipOnly)])).await.unwrap().into_inner();
    assert_eq!(warned.warnings.len(), 2, "{:?}", warned.warnings);
    assert!(warned.warnings[0].contains("model `sd3`: no active worker serves it with text encoders `all`"), "{:?}", warned.warnings);

    w.register_worker(pb::RegisterWorkerRequest {
        name: "clip-only".into(),
        models: vec!["sd3".into()],
        text_encoder_sets: vec![pb::TextEncoderSet::ClipOnly as i32],
        capacity: 1,
        ..Default::default()
    })
    .await
    .unwrap();
    let warned =
        r.submit_batch(submit(vec![spec(pb::TextEncoderSet::All), spec(pb::TextEncoderSet::ClipOnly)])).await.unwrap().into_inner();
    assert_eq!(warned.warnings.len(), 1, "CLIP-only is served now: {:?}", warned.warnings);
    let stats = a.get_queue_stats(pb::GetQueueStatsRequest { model: "sd3".into() }).await.unwrap().into_inner();
    let waiting = &stats.models[0].waiting_for_worker;
    assert_eq!(waiting.len(), 1);
    assert_eq!((waiting[0].text_encoders, waiting[0].jobs), (pb::TextEncoderSet::All as i32, 2));
    h.stop().await;
}
