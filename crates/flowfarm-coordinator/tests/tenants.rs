//! Tenants and quotas end to end against a real Postgres: every RenderService
//! RPC × {own batch, another tenant's batch} × {submit token, admin token};
//! quotas refused with RESOURCE_EXHAUSTED naming the limit; token
//! administration over the API. A refused call changes nothing.

use std::time::Duration;

use flowfarm_core::{Role, TextEncoderSet};
use flowfarm_proto::v1 as pb;
use flowfarm_store::{NewToken, Quotas};
use flowfarm_testkit::Harness;
use tokio_stream::StreamExt;
use tonic::Code;

fn two_jobs(key: &str) -> pb::SubmitBatchRequest {
    let spec = |prompt: &str| pb::JobSpec { model: "sd3".into(), prompt: prompt.into(), steps: 2, ..Default::default() };
    pb::SubmitBatchRequest { jobs: vec![spec("a harbour"), spec("a hill")], idempotency_key: key.into(), ..Default::default() }
}

fn n_jobs(n: usize) -> pb::SubmitBatchRequest {
    let spec = pb::JobSpec { model: "sd3".into(), prompt: "a field".into(), ..Default::default() };
    pb::SubmitBatchRequest { jobs: vec![spec; n], ..Default::default() }
}

/// Registers a worker and runs the batch's first job to success with a
/// result object, as a worker would; `gpu_seconds` is the attempt's time.
async fn render_first_job(h: &Harness, worker_id: &str, batch_id: &str, gpu_seconds: f64) -> String {
    let mut w = h.worker();
    let jobs =
        h.db.store
            .list_jobs(&flowfarm_store::JobFilter { batch_id: Some(batch_id.parse().unwrap()), ..Default::default() }, None, 10)
            .await
            .unwrap();
    let job_id = jobs[0].id;
    // As the dispatcher would: every queued job of the model goes out.
    h.db.store.dispatch_jobs("sd3", TextEncoderSet::All, 1000, "test").await.unwrap();
    let start = w.start_job(pb::StartJobRequest { worker_id: worker_id.into(), job_id: job_id.to_string() }).await.unwrap().into_inner();
    let key = format!("{job_id}.png");
    let png = format!("png of {job_id}").into_bytes();
    std::fs::write(h.results_dir.path().join(&key), &png).unwrap();
    let sha256 = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(&png))
    };
    w.complete_job(pb::CompleteJobRequest {
        worker_id: worker_id.into(),
        job_id: job_id.to_string(),
        attempt: start.attempt,
        result: Some(pb::JobResult {
            key,
            sha256,
            size_bytes: png.len() as u64,
            content_type: "image/png".into(),
            model_hash: String::new(),
        }),
        gpu_seconds,
    })
    .await
    .unwrap();
    job_id.to_string()
}

async fn register(h: &Harness) -> String {
    h.worker()
        .register_worker(pb::RegisterWorkerRequest {
            name: "w".into(),
            hostname: "w".into(),
            models: vec!["sd3".into()],
            text_encoder_sets: vec![pb::TextEncoderSet::All as i32],
            capacity: 4,
            version: "test".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .worker_id
}

/// Everything a refused call must leave as it was: rows, states, events.
async fn snapshot(h: &Harness) -> (i64, i64, i64, Vec<(String, String)>) {
    let (batches, jobs, events) = h.rows().await;
    let states: Vec<(String, String)> =
        sqlx::query_as("SELECT id::text, state FROM jobs ORDER BY id").fetch_all(h.db.store.pool()).await.unwrap();
    (batches, jobs, events, states)
}

/// What one call came back with: the code, and for a success what it saw.
#[derive(Debug, PartialEq)]
enum Seen {
    Ok(String),
    Refused(Code),
}

async fn call(h: &Harness, token: &str, rpc: &str, batch: &Target) -> Seen {
    let mut r = h.render_as(Some(token));
    let seen = match rpc {
        // A replay of the batch's own request: the same batch for its tenant;
        // for any other caller a new batch, since keys belong to a tenant.
        "SubmitBatch" => r.submit_batch(two_jobs(&batch.key)).await.map(|r| {
            let r = r.into_inner();
            format!("created={} same={}", r.created, r.batch.unwrap().id == batch.id)
        }),
        "GetBatch" => r.get_batch(pb::GetBatchRequest { batch_id: batch.id.clone() }).await.map(|b| b.into_inner().id),
        "GetJob" => r.get_job(pb::GetJobRequest { job_id: batch.job.clone() }).await.map(|j| j.into_inner().id),
        "ListJobs" => r
            .list_jobs(pb::ListJobsRequest { batch_id: batch.id.clone(), ..Default::default() })
            .await
            .map(|l| format!("{} jobs", l.into_inner().jobs.len())),
        "WatchBatch" => match r.watch_batch(pb::WatchBatchRequest { batch_id: batch.id.clone(), ..Default::default() }).await {
            Ok(stream) => {
                let first = tokio::time::timeout(Duration::from_secs(10), stream.into_inner().next()).await.unwrap().unwrap().unwrap();
                match first.event {
                    Some(pb::watch_batch_event::Event::Snapshot(b)) => Ok(format!("snapshot {}", b.id == batch.id)),
                    other => panic!("first event {other:?}"),
                }
            }
            Err(status) => Err(status),
        },
        "GetResult" => match r.get_result(pb::GetResultRequest { job_id: batch.job.clone() }).await {
            Ok(stream) => {
                let chunks: Vec<_> = stream.into_inner().collect().await;
                Ok(format!("{} bytes", chunks.into_iter().map(|c| c.unwrap().data.len()).sum::<usize>()))
            }
            Err(status) => Err(status),
        },
        "CancelJobs" => r
            .cancel_jobs(pb::CancelJobsRequest { batch_id: batch.id.clone(), ..Default::default() })
            .await
            .map(|c| format!("cancelled {}", c.into_inner().cancelled)),
        "CancelJobs by id" => r
            .cancel_jobs(pb::CancelJobsRequest { job_ids: vec![batch.job.clone()], ..Default::default() })
            .await
            .map(|c| format!("cancelled {}", c.into_inner().cancelled)),
        other => panic!("unknown rpc {other}"),
    };
    match seen {
        Ok(what) => Seen::Ok(what),
        Err(status) => {
            if status.code() == Code::NotFound {
                // Exactly what a missing id says: nothing tells that it exists.
                let missing = status.message().replace(&batch.id, "ID").replace(&batch.job, "ID");
                assert!(missing == "batch ID not found" || missing == "job ID not found", "{rpc}: {}", status.message());
            }
            Seen::Refused(status.code())
        }
    }
}

struct Target {
    id: String,
    key: String,
    /// Its first job, rendered.
    job: String,
}

#[tokio::test]
async fn each_tenant_sees_and_acts_on_its_own_batches_and_admins_on_all() {
    let h = Harness::start().await;
    let (_, other_token) = h.db.store.create_token(&NewToken::new("other-studio", Role::Submit), rand::random()).await.unwrap();
    let worker_id = register(&h).await;
    let mut targets = Vec::new();
    for (token, key) in [(&h.submit_token, "own-key"), (&other_token, "their-key")] {
        let batch = h.render_as(Some(token)).submit_batch(two_jobs(key)).await.unwrap().into_inner().batch.unwrap();
        let job = render_first_job(&h, &worker_id, &batch.id, 1.0).await;
        targets.push(Target { id: batch.id, key: key.into(), job });
    }
    let (own, theirs) = (&targets[0], &targets[1]);
    let png = |t: &Target| Seen::Ok(format!("{} bytes", format!("png of {}", t.job).len()));
    let ok = |s: &str| Seen::Ok(s.to_owned());
    let not_found = Seen::Refused(Code::NotFound);

    // (rpc, caller, batch, expected). Cancels go last: they change state.
    let sub = h.submit_token.clone();
    let adm = h.admin_token.clone();
    let table: Vec<(&str, &str, &Target, Seen)> = vec![
        ("SubmitBatch", &sub, own, ok("created=false same=true")),
        ("SubmitBatch", &sub, theirs, ok("created=true same=false")),
        ("SubmitBatch", &adm, own, ok("created=true same=false")),
        ("SubmitBatch", &adm, theirs, ok("created=true same=false")),
        ("GetBatch", &sub, own, ok(&own.id)),
        ("GetBatch", &sub, theirs, not_found),
        ("GetBatch", &adm, own, ok(&own.id)),
        ("GetBatch", &adm, theirs, ok(&theirs.id)),
        ("GetJob", &sub, own, ok(&own.job)),
        ("GetJob", &sub, theirs, Seen::Refused(Code::NotFound)),
        ("GetJob", &adm, own, ok(&own.job)),
        ("GetJob", &adm, theirs, ok(&theirs.job)),
        ("ListJobs", &sub, own, ok("2 jobs")),
        ("ListJobs", &sub, theirs, Seen::Refused(Code::NotFound)),
        ("ListJobs", &adm, own, ok("2 jobs")),
        ("ListJobs", &adm, theirs, ok("2 jobs")),
        ("WatchBatch", &sub, own, ok("snapshot true")),
        ("WatchBatch", &sub, theirs, Seen::Refused(Code::NotFound)),
        ("WatchBatch", &adm, own, ok("snapshot true")),
        ("WatchBatch", &adm, theirs, ok("snapshot true")),
        ("GetResult", &sub, own, png(own)),
        ("GetResult", &sub, theirs, Seen::Refused(Code::NotFound)),
        ("GetResult", &adm, own, png(own)),
        ("GetResult", &adm, theirs, png(theirs)),
        ("CancelJobs", &sub, theirs, Seen::Refused(Code::NotFound)),
        ("CancelJobs by id", &sub, theirs, Seen::Refused(Code::NotFound)),
        // The first job succeeded: only the second is cancelled.
        ("CancelJobs", &sub, own, ok("cancelled 1")),
        ("CancelJobs by id", &sub, own, ok("cancelled 0")),
        ("CancelJobs", &adm, theirs, ok("cancelled 1")),
        ("CancelJobs by id", &adm, own, ok("cancelled 0")),
    ];
    let rpcs: std::collections::BTreeSet<&str> = table.iter().map(|row| row.0.split(' ').next().unwrap()).collect();
    assert_eq!(rpcs.len(), 7, "every RenderService RPC: {rpcs:?}");
    for (rpc, token, target, expected) in table {
        let before = snapshot(&h).await;
        let seen = call(&h, token, rpc, target).await;
        let who = if token == sub { "submit" } else { "admin" };
        let whose = if std::ptr::eq(target, own) { "own" } else { "other's" };
        assert_eq!(seen, expected, "{rpc} × {whose} batch × {who} token");
        if matches!(seen, Seen::Refused(_)) {
            assert_eq!(snapshot(&h).await, before, "{rpc} × {whose} × {who}: a refused call changed something");
        }
    }

    // An unfiltered listing holds the tenant's jobs only; an admin's holds all.
    let listed = |token: String| {
        let mut r = h.render_as(Some(&token));
        async move {
            let jobs = r.list_jobs(pb::ListJobsRequest { page_size: 1000, ..Default::default() }).await.unwrap().into_inner().jobs;
            jobs.into_iter().map(|j| j.batch_id).collect::<std::collections::BTreeSet<_>>()
        }
    };
    let mine = listed(sub.clone()).await;
    assert!(mine.contains(&own.id) && !mine.contains(&theirs.id), "{mine:?}");
    let all = listed(adm.clone()).await;
    assert!(all.contains(&own.id) && all.contains(&theirs.id), "{all:?}");
    h.stop().await;
}

#[tokio::test]
async fn quotas_refuse_with_the_limit_named_and_store_nothing() {
    let h = Harness::start().await;
    let quotas = Quotas { max_queued_jobs: Some(5), max_batch_jobs: Some(3), max_gpu_seconds_per_day: Some(10.0) };
    let (_, token) = h.db.store.create_token(&NewToken { quotas, ..NewToken::new("metered", Role::Submit) }, rand::random()).await.unwrap();
    let mut r = h.render_as(Some(&token));
    let refused = |result: Result<tonic::Response<pb::SubmitBatchResponse>, tonic::Status>, limit: &str| {
        let status = result.expect_err("over quota");
        assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
        assert!(status.message().contains(limit), "names {limit}: {}", status.message());
    };

    let before = snapshot(&h).await;
    refused(r.submit_batch(n_jobs(4)).await, "max_batch_jobs");
    assert_eq!(snapshot(&h).await, before, "a refused batch stores nothing");

    let first = r.submit_batch(n_jobs(3)).await.unwrap().into_inner().batch.unwrap();
    let before = snapshot(&h).await;
    refused(r.submit_batch(n_jobs(3)).await, "max_queued_jobs");
    assert_eq!(snapshot(&h).await, before);
    r.submit_batch(n_jobs(2)).await.expect("3 + 2 fit the 5 at once");

    // Finished jobs no longer count against the limit.
    r.cancel_jobs(pb::CancelJobsRequest { batch_id: first.id.clone(), ..Default::default() }).await.unwrap();
    let third = r.submit_batch(n_jobs(3)).await.unwrap().into_inner().batch.unwrap();

    // 12 GPU-seconds used over the last 24 hours: the 10 a day are spent.
    let worker_id = register(&h).await;
    render_first_job(&h, &worker_id, &third.id, 12.0).await;
    let before = snapshot(&h).await;
    refused(r.submit_batch(n_jobs(1)).await, "max_gpu_seconds_per_day");
    assert_eq!(snapshot(&h).await, before);

    // Concurrent submissions cannot both slip under the limit.
    let h2 = Harness::start().await;
    let quotas = Quotas { max_queued_jobs: Some(4), ..Quotas::default() };
    let (_, token) = h2.db.store.create_token(&NewToken { quotas, ..NewToken::new("racer", Role::Submit) }, rand::random()).await.unwrap();
    let submits = (0..8).map(|_| {
        let mut r = h2.render_as(Some(&token));
        async move { r.submit_batch(n_jobs(1)).await.is_ok() }
    });
    let accepted = futures::future::join_all(submits).await.into_iter().filter(|ok| *ok).count();
    assert_eq!(accepted, 4, "exactly the limit is accepted");
    assert_eq!(h2.rows().await.1, 4);
    h2.stop().await;

    // Admins and unlimited tokens are not held to anyone's quota.
    h.render().submit_batch(n_jobs(10)).await.expect("the harness's submit token has no quotas");
    h.stop().await;
}

#[tokio::test]
async fn admins_make_list_and_revoke_tokens_over_the_api() {
    let h = Harness::start().await;
    let mut admin = h.admin();
    let created = admin
        .create_token(pb::CreateTokenRequest {
            name: "studio-b".into(),
            role: pb::TokenRole::Submit as i32,
            expires_in_seconds: 3600,
            quotas: Some(pb::TokenQuotas { max_batch_jobs: 2, ..Default::default() }),
        })
        .await
        .unwrap()
        .into_inner();
    let token = created.token.unwrap();
    assert!(created.secret.starts_with("fft_"));
    assert_eq!((token.name.as_str(), token.quotas.unwrap().max_batch_jobs), ("studio-b", 2));
    assert!(token.expires_at.is_some() && token.revoked_at.is_none());
    let stored: Vec<Vec<u8>> =
        sqlx::query_scalar("SELECT token_hash FROM api_tokens WHERE name = 'studio-b'").fetch_all(h.db.store.pool()).await.unwrap();
    assert!(!stored[0].windows(created.secret.len()).any(|w| w == created.secret.as_bytes()), "only the hash is stored");

    // The secret works, within its quotas.
    let mut r = h.render_as(Some(&created.secret));
    let batch = r.submit_batch(n_jobs(2)).await.unwrap().into_inner().batch.unwrap();
    assert_eq!(batch.submitter, "studio-b");
    assert_eq!(r.submit_batch(n_jobs(3)).await.unwrap_err().code(), Code::ResourceExhausted);

    let listed = admin.list_tokens(pb::ListTokensRequest::default()).await.unwrap().into_inner().tokens;
    let names: Vec<&str> = listed.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, ["sub", "adm", "wrk", "studio-b"]);

    // Bad requests name their field and make nothing.
    let bad = [
        (pb::CreateTokenRequest { name: String::new(), role: 1, ..Default::default() }, "name"),
        (pb::CreateTokenRequest { name: "a b".into(), role: 1, ..Default::default() }, "name"),
        (pb::CreateTokenRequest { name: "x".into(), role: 0, ..Default::default() }, "role"),
        (pb::CreateTokenRequest { name: "x".into(), role: 9, ..Default::default() }, "role"),
        (pb::CreateTokenRequest { name: "x".into(), role: 1, expires_in_seconds: u64::MAX, ..Default::default() }, "expires_in_seconds"),
        (
            pb::CreateTokenRequest {
                name: "x".into(),
                role: 1,
                quotas: Some(pb::TokenQuotas { max_gpu_seconds_per_day: f64::NAN, ..Default::default() }),
                ..Default::default()
            },
            "quotas.max_gpu_seconds_per_day",
        ),
        (
            pb::CreateTokenRequest {
                name: "x".into(),
                role: 2,
                quotas: Some(pb::TokenQuotas { max_queued_jobs: 3, ..Default::default() }),
                ..Default::default()
            },
            "quotas",
        ),
    ];
    for (request, field) in bad {
        let status = admin.create_token(request.clone()).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{request:?}");
        assert!(status.message().starts_with(field), "{field}: {}", status.message());
    }
    assert_eq!(admin.list_tokens(pb::ListTokensRequest::default()).await.unwrap().into_inner().tokens.len(), 4);
    // Submit tokens cannot administer tokens.
    let denied = h.admin_as(Some(&h.submit_token)).list_tokens(pb::ListTokensRequest::default()).await.unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);

    // Revoked: refused at once on this coordinator, listed only with include_dead.
    let revoked = admin.revoke_token(pb::RevokeTokenRequest { token_id: token.token_id.clone() }).await.unwrap().into_inner();
    assert!(revoked.revoked_at.is_some());
    assert_eq!(r.get_batch(pb::GetBatchRequest { batch_id: batch.id.clone() }).await.unwrap_err().code(), Code::Unauthenticated);
    let again = admin.revoke_token(pb::RevokeTokenRequest { token_id: token.token_id.clone() }).await.unwrap_err();
    assert_eq!(again.code(), Code::NotFound);
    assert_eq!(admin.list_tokens(pb::ListTokensRequest::default()).await.unwrap().into_inner().tokens.len(), 3);
    assert_eq!(admin.list_tokens(pb::ListTokensRequest { include_dead: true }).await.unwrap().into_inner().tokens.len(), 4);

    // Expired tokens stop working even while cached.
    let short = admin
        .create_token(pb::CreateTokenRequest { name: "brief".into(), role: 1, expires_in_seconds: 1, ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    let mut brief = h.render_as(Some(&short.secret));
    brief.list_jobs(pb::ListJobsRequest::default()).await.expect("works before it expires");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(brief.list_jobs(pb::ListJobsRequest::default()).await.unwrap_err().code(), Code::Unauthenticated);
    h.stop().await;
}

#[tokio::test]
async fn the_first_admin_token_is_made_once_and_written_for_its_owner_only() {
    let db = flowfarm_testkit::TestDb::new().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("admin.token");
    use flowfarm_coordinator::tokens::{ensure_first_admin_token, FirstAdmin};
    assert_eq!(ensure_first_admin_token(&db.store, &path).await.unwrap(), FirstAdmin::Written(path.clone()));
    let secret = std::fs::read_to_string(&path).unwrap();
    let info = db.store.authenticate(secret.trim()).await.unwrap().expect("the written secret authenticates");
    assert_eq!((info.role, info.name.as_str()), (Role::Admin, "admin"));
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
    }
    // Started again (or by a second coordinator at once): nothing new.
    let (a, b) = tokio::join!(ensure_first_admin_token(&db.store, &path), ensure_first_admin_token(&db.store, &path));
    assert_eq!((a.unwrap(), b.unwrap()), (FirstAdmin::Exists, FirstAdmin::Exists));
    assert_eq!(std::fs::read_to_string(&path).unwrap(), secret);

    // A file that cannot be written leaves no live token behind.
    let db = flowfarm_testkit::TestDb::new().await;
    let not_a_folder = dir.path().join("a-file");
    std::fs::write(&not_a_folder, "").unwrap();
    let unwritable = not_a_folder.join("admin.token");
    let err = ensure_first_admin_token(&db.store, &unwritable).await.unwrap_err();
    assert!(err.to_string().contains("a-file/admin.token"), "{err}");
    assert!(db.store.list_tokens(false).await.unwrap().is_empty());
}
