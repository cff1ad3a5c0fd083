//! End to end: the `flowfarm` and `farmctl` binaries as separate processes
//! against a real Postgres.
//!
//! farmctl is another package's binary, so these tests find it next to
//! `flowfarm` in the target folder; `scripts/test.sh` builds every binary
//! before running the tests.

mod common;

use std::collections::BTreeMap;
use std::process::Command;

use common::*;

use flowfarm_proto::v1 as pb;
use flowfarm_proto::v1::worker_service_client::WorkerServiceClient;
use flowfarm_testkit::TestDb;
use serde_json::Value;

async fn rows(db: &TestDb) -> (i64, i64) {
    let batches = sqlx::query_scalar("SELECT count(*) FROM batches").fetch_one(db.store.pool()).await.unwrap();
    let jobs = sqlx::query_scalar("SELECT count(*) FROM jobs").fetch_one(db.store.pool()).await.unwrap();
    (batches, jobs)
}

/// Bad batch files through farmctl: each refused with a message naming the
/// field (or the file line), exit status 1, and no rows written.
// Multi-threaded: the tests block on child processes while client connections live.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn farmctl_refuses_bad_batch_files_with_field_messages() {
    let db = TestDb::new().await;
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&db, dir.path());
    let submitter = token(&db, "submit", "alice");
    let job = |extra: &str| format!("{{\"model\":\"sd3-medium\",\"prompt\":\"a fox\"{extra}}}\n");
    let grid = |top: &str, base: &str| format!("{top}\n[base]\nmodel = \"sd3-medium\"\n{base}\n");
    let cases: Vec<(&str, String, &str)> = vec![
        ("w.jsonl", job(",\"width\":1000"), "jobs[0].width: 1000 is not a multiple of 16"),
        ("h.jsonl", job(",\"height\":8192"), "jobs[0].height: 8192 exceeds model sd3-medium's limit of 3072 pixels"),
        ("small.jsonl", job(",\"width\":48"), "jobs[0].width: 48 is below the minimum of 64"),
        ("steps0.jsonl", job(",\"steps\":201"), "jobs[0].steps: 201 is outside 1..=200"),
        ("g.jsonl", job(",\"guidance_scale\":-0.5"), "jobs[0].guidance_scale: -0.5 is outside [0, 30]"),
        ("g2.jsonl", job(",\"guidance_scale\":99"), "jobs[0].guidance_scale: 99 is outside [0, 30]"),
        ("shift.jsonl", job(",\"shift\":-3"), "jobs[0].shift: -3 is outside (0, 100]"),
        ("shift2.jsonl", job(",\"shift\":500"), "jobs[0].shift: 500 is outside (0, 100]"),
        ("seed.jsonl", job(",\"seed\":18446744073709551615"), "jobs[0].seed: 18446744073709551615 is above the maximum"),
        ("prio.jsonl", job(",\"priority\":-1001"), "jobs[0].priority: -1001 is outside -1000..=1000"),
        ("att.jsonl", job(",\"max_attempts\":50"), "jobs[0].max_attempts: 50 is outside 1..=10"),
        ("model.jsonl", "{\"prompt\":\"x\"}\n".into(), "jobs[0].model: required"),
        ("model2.jsonl", "{\"model\":\"dall-e\",\"prompt\":\"x\"}\n".into(), "jobs[0].model: unknown model `dall-e`"),
        ("prompt.jsonl", "{\"model\":\"sd3-medium\"}\n".into(), "jobs[0].prompt: must not be empty"),
        ("long.jsonl", job(&format!(",\"negative_prompt\":\"{}\"", "n".repeat(2100))), "jobs[0].negative_prompt: 2100 characters"),
        ("nul.jsonl", "{\"model\":\"sd3-medium\",\"prompt\":\"a\\u0000b\"}\n".into(), "jobs[0].prompt: must not contain NUL"),
        ("enc.jsonl", job(",\"text_encoders\":\"t5-only\""), "jobs[0].text_encoders: `t5-only` is not `all` or `clip-only`"),
        ("label.jsonl", job(",\"labels\":{\"Shot\":\"1\"}"), "jobs[0].labels[\"Shot\"]: label keys are"),
        ("second.jsonl", format!("{}{}", job(""), job(",\"steps\":0,\"width\":17")), "jobs[1].width: 17 is not a multiple of 16"),
        ("typo.jsonl", job(",\"widht\":512"), "typo.jsonl:1: not a job spec"),
        ("json.jsonl", "{\"model\": \n".into(), "json.jsonl:1: not a job spec"),
        ("type.jsonl", job(",\"width\":\"wide\""), "type.jsonl:1: not a job spec"),
        ("empty.jsonl", "\n\n".into(), "empty.jsonl: no jobs in file"),
        ("batch.csv", "model,prompt\n".into(), "batch.csv: unknown batch file type"),
        ("noprompts.toml", grid("", ""), "grid.prompts: a grid needs at least one prompt"),
        (
            "size.toml",
            grid("prompts = [\"a\"]\nsizes = [{ width = 1024, height = 1000 }]", ""),
            "grid.sizes[0].height: 1000 is not a multiple of 16",
        ),
        (
            "zero.toml",
            grid("prompts = [\"a\"]\nsizes = [{ width = 0, height = 512 }]", ""),
            "grid.sizes[0]: width and height must both be set",
        ),
        ("baseprompt.toml", grid("prompts = [\"a\"]", "prompt = \"x\""), "grid.base.prompt: must be empty"),
        ("baseseed.toml", grid("prompts = [\"a\"]", "seed = 4"), "grid.base.seed: must be unset"),
        ("gridshift.toml", grid("prompts = [\"a\"]", "shift = 0.0"), "grid.base.shift: 0 is outside (0, 100]"),
        ("gridprompt.toml", grid("prompts = [\"a\", \"  \"]", ""), "grid.prompts[1]: must not be empty"),
        ("gridsteps.toml", grid("prompts = [\"a\"]", "steps = 999"), "grid.base.steps: 999 is outside 1..=200"),
        ("gridnan.toml", grid("prompts = [\"a\"]", "guidance_scale = nan"), "grid.base.guidance_scale: NaN is not a finite number"),
        (
            "gridbig.toml",
            grid(
                &format!(
                    "prompts = [{}]\nseeds = [{}]",
                    vec!["\"p\""; 400].join(","),
                    (0..251).map(|i| i.to_string()).collect::<Vec<_>>().join(",")
                ),
                "",
            ),
            "grid: expands to 100400 jobs, more than the limit of 100000",
        ),
        (
            "gridkey.toml",
            grid("prompts = [\"a\"]\nidempotency_key = \"bad\\u0007key\"", ""),
            "idempotency_key: must not contain control characters",
        ),
        ("gridlabel.toml", grid("prompts = [\"a\"]\nlabels = { \"Project X\" = \"1\" }", ""), "labels[\"Project X\"]: label keys are"),
        ("gridunknown.toml", grid("prompts = [\"a\"]\ncolour = \"red\"", ""), "gridunknown.toml: not a grid file"),
    ];
    assert!(cases.len() >= 30);
    let before = rows(&db).await;
    for (name, text, expected) in &cases {
        let path = write(dir.path(), name, text);
        let out = farmctl(&server.url(), &submitter, &["submit", path.to_str().unwrap()]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{name}: {stderr}");
        assert!(stderr.contains(expected), "{name}: expected `{expected}` in `{stderr}`");
        assert_eq!(rows(&db).await, before, "{name} wrote rows");
    }
    server.stop();
}

/// A worker-role client with a registered worker serving sd3-medium.
async fn registered_worker(server: &Server, token: &str) -> (flowfarm_testkit::Worker, String) {
    let channel = tonic::transport::Channel::from_shared(server.url()).unwrap().connect().await.unwrap();
    let mut client = WorkerServiceClient::with_interceptor(channel, flowfarm_testkit::Auth::new(token).unwrap());
    let worker_id = client
        .register_worker(pb::RegisterWorkerRequest {
            name: "w1".into(),
            models: vec!["sd3-medium".into()],
            capacity: 2,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .worker_id;
    (client, worker_id)
}

fn snapshot(server: &str, admin: &str, batches: &[String]) -> Value {
    let mut state = BTreeMap::new();
    state.insert("jobs", ok_json(farmctl(server, admin, &["--json", "jobs", "list"])));
    state.insert("queue", ok_json(farmctl(server, admin, &["--json", "queue", "stats"])));
    let mut workers = ok_json(farmctl(server, admin, &["--json", "workers", "list"]));
    // The only thing allowed to differ: nothing. Heartbeat time is not sent by anyone here.
    if let Some(list) = workers.as_array_mut() {
        list.sort_by_key(|w| w["id"].as_str().unwrap_or_default().to_owned());
    }
    state.insert("workers", workers);
    let mut queue = state.remove("queue").unwrap();
    for model in queue["models"].as_array_mut().into_iter().flatten() {
        // Ages grow with the clock; everything else must not move.
        model["oldest_queued_seconds"] = Value::Null;
    }
    state.insert("queue", queue);
    for (i, b) in batches.iter().enumerate() {
        let key: &'static str = Box::leak(format!("batch{i}").into_boxed_str());
        state.insert(key, ok_json(farmctl(server, admin, &["--json", "batch", b])));
    }
    serde_json::to_value(state).unwrap()
}

/// Restarting the coordinator loses and changes nothing: batches, jobs in
/// every state, workers and pauses read back identical; leases and
/// heartbeat times are renewed, never shortened.
// Multi-threaded: the tests block on child processes while client connections live.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_restart_loses_and_changes_nothing() {
    let db = TestDb::new().await;
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&db, dir.path());
    let (submitter, admin, worker) = (token(&db, "submit", "alice"), token(&db, "admin", "ops"), token(&db, "worker", "gpu"));
    let grid =
        write(dir.path(), "grid.toml", "prompts = [\"a\", \"b\", \"c\"]\nseeds = [1, 2]\n[base]\nmodel = \"sd3-medium\"\nsteps = 20\n");
    let jsonl = write(dir.path(), "jobs.jsonl", "{\"model\":\"sd3.5-large\",\"prompt\":\"x\",\"width\":2048,\"height\":1024}\n");
    let b1 = ok_json(farmctl(&server.url(), &submitter, &["--json", "submit", grid.to_str().unwrap()]));
    let b2 = ok_json(farmctl(&server.url(), &submitter, &["--json", "submit", "--label", "team=vfx", jsonl.to_str().unwrap()]));
    let batches = vec![b1["batch"]["id"].as_str().unwrap().to_owned(), b2["batch"]["id"].as_str().unwrap().to_owned()];
    assert!(farmctl(&server.url(), &admin, &["queue", "pause", "--model", "sd3.5-large"]).status.success());

    // Drive some jobs into other states through the worker API.
    let (mut w, worker_id) = registered_worker(&server, &worker).await;
    let dispatched = db.store.dispatch_jobs("sd3-medium", flowfarm_core::TextEncoderSet::All, 3, "test").await.unwrap();
    for job in &dispatched[..2] {
        w.start_job(pb::StartJobRequest { worker_id: worker_id.clone(), job_id: job.id.to_string() }).await.unwrap();
    }
    w.fail_job(pb::FailJobRequest {
        worker_id,
        job_id: dispatched[1].id.to_string(),
        attempt: 1,
        error: "bad".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let mut cancel_one = farmctl(&server.url(), &submitter, &["jobs", "cancel", &dispatched[2].id.to_string()]);
    assert!(cancel_one.status.success(), "{}", String::from_utf8_lossy(&cancel_one.stderr));

    drop(w);
    let before = snapshot(&server.url(), &admin, &batches);
    let events_before: i64 = sqlx::query_scalar("SELECT count(*) FROM job_events").fetch_one(db.store.pool()).await.unwrap();
    server.stop();
    let server = Server::start(&db, dir.path());
    let mut after = snapshot(&server.url(), &admin, &batches);
    // The one deliberate change: nobody could renew a lease or heartbeat
    // while the coordinator was away, so it renews them at start; no lease
    // is shortened and no worker heard from earlier than before.
    let later = |b: &serde_json::Value, a: &serde_json::Value| b.as_str().zip(a.as_str()).is_some_and(|(b, a)| a >= b);
    let mut before = before;
    for (b, a) in before["jobs"].as_array_mut().unwrap().iter_mut().zip(after["jobs"].as_array_mut().unwrap()) {
        if !b["lease_expires_at"].is_null() {
            assert!(later(&b["lease_expires_at"], &a["lease_expires_at"]), "lease shortened: {b} → {a}");
            b["lease_expires_at"] = a["lease_expires_at"].clone();
        }
    }
    for (b, a) in before["workers"].as_array_mut().unwrap().iter_mut().zip(after["workers"].as_array_mut().unwrap()) {
        assert!(later(&b["last_heartbeat_at"], &a["last_heartbeat_at"]));
        b["last_heartbeat_at"] = a["last_heartbeat_at"].clone();
    }
    assert_eq!(before, after);
    let events_after: i64 = sqlx::query_scalar("SELECT count(*) FROM job_events").fetch_one(db.store.pool()).await.unwrap();
    assert_eq!(events_before, events_after);
    // And it still works: the same idempotent resubmission is recognised.
    cancel_one = farmctl(&server.url(), &submitter, &["--json", "submit", "--idempotency-key", "k", grid.to_str().unwrap()]);
    assert!(ok_json(cancel_one)["created"].as_bool().unwrap());
    server.stop();
}

/// A 10,000-job grid through farmctl; list pages through all of it; cancel
/// by batch; watch exits 3 because nothing succeeded.
// Multi-threaded: the tests block on child processes while client connections live.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn farmctl_submits_lists_cancels_and_watches_a_big_grid() {
    let db = TestDb::new().await;
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&db, dir.path());
    let submitter = token(&db, "submit", "alice");
    let prompts: Vec<String> = (0..100).map(|i| format!("\"shot {i}\"")).collect();
    let seeds: Vec<String> = (0..50).map(|i| i.to_string()).collect();
    let text = format!(
        "prompts = [{}]\nseeds = [{}]\nsizes = [{{ width = 1024, height = 1024 }}, {{ width = 768, height = 1344 }}]\n[base]\nmodel = \"sd3-medium\"\n",
        prompts.join(","),
        seeds.join(",")
    );
    let path = write(dir.path(), "big.toml", &text);
    let submitted = ok_json(farmctl(&server.url(), &submitter, &["--json", "submit", path.to_str().unwrap()]));
    assert_eq!(submitted["batch"]["total_jobs"], 10_000);
    let batch = submitted["batch"]["id"].as_str().unwrap().to_owned();
    assert_eq!(rows(&db).await, (1, 10_000));

    let listed = farmctl(&server.url(), &submitter, &["jobs", "list", "--batch", &batch]);
    assert!(listed.status.success());
    assert_eq!(String::from_utf8_lossy(&listed.stdout).lines().count(), 10_000);

    let cancelled = ok_json(farmctl(&server.url(), &submitter, &["--json", "jobs", "cancel", "--batch", &batch]));
    assert_eq!(cancelled["updated"], 10_000);
    let watch = farmctl(&server.url(), &submitter, &["watch", &batch]);
    assert_eq!(watch.status.code(), Some(3), "{}", String::from_utf8_lossy(&watch.stderr));
    assert!(String::from_utf8_lossy(&watch.stdout).contains("cancelled 10000"));
    server.stop();
}

/// The messages a user sees when the farm is not there or the token is wrong.
// Multi-threaded: the tests block on child processes while client connections live.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn farmctl_explains_connection_and_auth_errors() {
    let db = TestDb::new().await;
    let dir = tempfile::tempdir().unwrap();
    let out = farmctl("http://127.0.0.1:1", "x", &["jobs", "list"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot reach the coordinator at http://127.0.0.1:1"));

    let server = Server::start(&db, dir.path());
    let out = farmctl(&server.url(), "fft_wrong", &["jobs", "list"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("refused the token") && stderr.contains("FLOWFARM_TOKEN"), "{stderr}");
    let submitter = token(&db, "submit", "alice");
    let out = farmctl(&server.url(), &submitter, &["queue", "pause"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("has role submit; this call needs admin"));

    let completions = Command::new(farmctl_bin()).args(["completions", "bash"]).output().unwrap();
    assert!(completions.status.success() && String::from_utf8_lossy(&completions.stdout).contains("farmctl"));
    server.stop();
}

/// A job rendered by a (stand-in) worker comes back through
/// `farmctl results fetch` byte for byte, and `watch` exits 0.
// Multi-threaded: the tests block on child processes while client connections live.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn farmctl_fetches_results_and_watch_succeeds() {
    let db = TestDb::new().await;
    let dir = tempfile::tempdir().unwrap();
    let results = dir.path().join("results");
    std::fs::create_dir_all(&results).unwrap();
    let server = Server::start(&db, &results);
    let (submitter, worker) = (token(&db, "submit", "alice"), token(&db, "worker", "gpu"));
    let path = write(dir.path(), "two.jsonl", &"{\"model\":\"sd3-medium\",\"prompt\":\"a fox\",\"steps\":2}\n".repeat(2));
    let batch = ok_json(farmctl(&server.url(), &submitter, &["--json", "submit", path.to_str().unwrap()]))["batch"]["id"]
        .as_str()
        .unwrap()
        .to_owned();

    let (mut w, worker_id) = registered_worker(&server, &worker).await;
    let mut images = Vec::new();
    for (i, job) in db.store.dispatch_jobs("sd3-medium", flowfarm_core::TextEncoderSet::All, 2, "test").await.unwrap().iter().enumerate() {
        w.start_job(pb::StartJobRequest { worker_id: worker_id.clone(), job_id: job.id.to_string() }).await.unwrap();
        let bytes = format!("image {i} of job {}", job.id).repeat(10_000).into_bytes();
        let key = format!("{}/{}.png", job.batch_id, job.id);
        std::fs::create_dir_all(results.join(job.batch_id.to_string())).unwrap();
        std::fs::write(results.join(&key), &bytes).unwrap();
        let sha = {
            use sha2::Digest;
            hex::encode(sha2::Sha256::digest(&bytes))
        };
        w.complete_job(pb::CompleteJobRequest {
            worker_id: worker_id.clone(),
            job_id: job.id.to_string(),
            attempt: 1,
            result: Some(pb::JobResult {
                key,
                sha256: sha,
                size_bytes: bytes.len() as u64,
                content_type: "image/png".into(),
                ..Default::default()
            }),
            gpu_seconds: 0.5,
        })
        .await
        .unwrap();
        images.push((job.index, job.id, bytes));
    }
    drop(w);
    let watch = farmctl(&server.url(), &submitter, &["watch", &batch]);
    assert_eq!(watch.status.code(), Some(0), "{}", String::from_utf8_lossy(&watch.stderr));

    let out_dir = dir.path().join("out");
    let fetched = ok_json(farmctl(&server.url(), &submitter, &["--json", "results", "fetch", &batch, "--out", out_dir.to_str().unwrap()]));
    assert_eq!(fetched["written"].as_array().unwrap().len(), 2);
    for (index, id, bytes) in images {
        let file = out_dir.join(format!("{index:05}-{id}.png"));
        assert_eq!(std::fs::read(&file).unwrap(), bytes, "{}", file.display());
    }
    server.stop();
}

/// From a fresh database: the coordinator writes the first admin token; with
/// it, `farmctl tokens` makes a tenant's token with a quota, lists and
/// revokes it; the tenant sees only its batches and is held to its quota.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_admin_token_makes_tenants_with_farmctl() {
    let db = TestDb::new().await;
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("secrets/admin.token");
    let env = [("FLOWFARM_AUTH__ADMIN_TOKEN_FILE".to_owned(), token_file.display().to_string())];
    let server = Server::start_env(&db, &config_path(), &dir.path().join("results"), "redis://127.0.0.1:1/", "127.0.0.1:0", &env);
    let admin = std::fs::read_to_string(&token_file).expect("the first admin token is written");
    let admin = admin.trim();
    let url = server.url();
    // A reload signal never stops a coordinator, with TLS or (here) without.
    server.signal("HUP");
    std::thread::sleep(std::time::Duration::from_millis(300));

    let made = ok_json(farmctl(
        &url,
        admin,
        &["--json", "tokens", "create", "--name", "studio-a", "--role", "submit", "--max-batch-jobs", "2", "--expires-in", "30d"],
    ));
    let studio_a = made["secret"].as_str().unwrap().to_owned();
    assert_eq!(made["token"]["quotas"]["max_batch_jobs"], 2, "{made}");
    assert!(made["token"]["expires_at"].is_string(), "{made}");
    let studio_b = ok_json(farmctl(&url, admin, &["--json", "tokens", "create", "--name", "studio-b", "--role", "submit"]))["secret"]
        .as_str()
        .unwrap()
        .to_owned();

    let job = "{\"model\":\"sd3-medium\",\"prompt\":\"a boat\"}\n";
    let two = write(dir.path(), "two.jsonl", &job.repeat(2));
    let three = write(dir.path(), "three.jsonl", &job.repeat(3));
    let batch_a =
        ok_json(farmctl(&url, &studio_a, &["--json", "submit", two.to_str().unwrap()]))["batch"]["id"].as_str().unwrap().to_owned();
    let over = farmctl(&url, &studio_a, &["submit", three.to_str().unwrap()]);
    assert_eq!(over.status.code(), Some(1));
    let said = String::from_utf8_lossy(&over.stderr);
    assert!(said.contains("over quota") && said.contains("max_batch_jobs"), "{said}");

    // Studio B neither sees nor cancels studio A's batch; the admin sees it.
    let hidden = farmctl(&url, &studio_b, &["batch", &batch_a]);
    assert!(String::from_utf8_lossy(&hidden.stderr).contains("not found"), "{}", String::from_utf8_lossy(&hidden.stderr));
    let cancel = farmctl(&url, &studio_b, &["jobs", "cancel", "--batch", &batch_a]);
    assert!(!cancel.status.success());
    assert_eq!(ok_json(farmctl(&url, &studio_b, &["--json", "jobs", "list"])), serde_json::json!([]));
    assert_eq!(ok_json(farmctl(&url, admin, &["--json", "batch", &batch_a]))["counts"]["queued"], 2);

    let listed = ok_json(farmctl(&url, admin, &["--json", "tokens", "list"]));
    let names: Vec<&str> = listed.as_array().unwrap().iter().map(|t| t["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["admin", "studio-a", "studio-b"]);
    let id = listed[1]["token_id"].as_str().unwrap();
    let revoked = farmctl(&url, admin, &["tokens", "revoke", id]);
    assert!(revoked.status.success(), "{}", String::from_utf8_lossy(&revoked.stderr));
    let refused = farmctl(&url, &studio_a, &["jobs", "list"]);
    assert!(String::from_utf8_lossy(&refused.stderr).contains("refused the token"), "{}", String::from_utf8_lossy(&refused.stderr));
    // Submit tokens do not administer tokens.
    let denied = farmctl(&url, &studio_b, &["tokens", "list"]);
    assert!(String::from_utf8_lossy(&denied.stderr).contains("not allowed"), "{}", String::from_utf8_lossy(&denied.stderr));
    server.stop();
}

/// `flowfarm config print`: the file, then the environment by the naming
/// rule, with secrets masked; a misspelt variable is named.
#[test]
fn config_print_shows_the_effective_config_with_secrets_masked() {
    let print = |env: &[(&str, &str)]| {
        Command::new(flowfarm_bin())
            .args(["--config", config_path().to_str().unwrap(), "config", "print"])
            .envs(env.iter().copied())
            .output()
            .unwrap()
    };
    let out = print(&[
        ("FLOWFARM_LEASES__LEASE_SECONDS", "45"),
        ("FLOWFARM_DATABASE__PASSWORD", "hunter2"),
        ("FLOWFARM_SERVER__TLS__CERT_FILE", "/tls/crt"),
        ("FLOWFARM_SERVER__TLS__KEY_FILE", "/tls/key"),
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("lease_seconds = 45"), "{text}");
    assert!(text.contains("cert_file = \"/tls/crt\""), "{text}");
    assert!(!text.contains("hunter2") && text.contains("postgres://postgres:***@"), "{text}");

    let out = print(&[("FLOWFARM_LEASES__LEASE_SECOND", "45")]);
    assert!(!out.status.success());
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("FLOWFARM_LEASES__LEASE_SECOND") && said.contains("unknown field"), "{said}");

    let worker = Command::new(flowfarm_bin())
        .args(["config", "print", "--worker", "--worker-config", repo_path("config/worker.toml").to_str().unwrap()])
        .current_dir(repo_path(""))
        .envs([("FLOWFARM_TOKEN", "fft_secret_token"), ("FLOWFARM_WORKER__CAPACITY", "3")])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&worker.stdout);
    assert!(worker.status.success(), "{}", String::from_utf8_lossy(&worker.stderr));
    assert!(text.contains("capacity = 3") && !text.contains("fft_secret_token"), "{text}");
}
