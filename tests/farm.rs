//! The whole farm: a `flowfarm coordinator` process, `flowfarm worker`
//! processes rendering the bundled model, a private `redis-server` and a
//! real Postgres; jobs submitted and inspected through `farmctl`.
//!
//! Timings in the test config are short (lease 3 s, heartbeat 1 s,
//! re-dispatch after 3 s) so that failures are recovered from quickly; no
//! test asserts on a duration.

mod common;

use std::collections::HashSet;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use common::browser::{chromium_dom, chromium_screenshot};
use common::*;
use flowfarm_engine::png_output::read_parameters;
use flowfarm_proto::v1 as pb;
use flowfarm_proto::v1::render_service_client::RenderServiceClient;
use flowfarm_testkit::TestDb;
use sha2::{Digest, Sha256};
use uuid::Uuid;

const MODEL: &str = "flowfarm-tiny";

/// Postgres database, Redis, coordinator, tokens and folders of one test.
// Fields drop in order: the coordinator goes before its database.
struct Farm {
    server: Option<Server>,
    redis: RedisServer,
    db: TestDb,
    dir: tempfile::TempDir,
    config: PathBuf,
    results: PathBuf,
    submitter: String,
    admin: String,
    worker_token: String,
    /// More environment for the coordinator and workers (results in S3).
    env: Vec<(String, String)>,
}

/// A `flowfarm worker` process of the farm.
struct Worker {
    process: WorkerProcess,
    name: String,
    metrics: std::net::SocketAddr,
}

impl Worker {
    fn log(&self) -> String {
        self.process.log()
    }
}

impl Farm {
    async fn start() -> Farm {
        Farm::start_env(Vec::new()).await
    }

    async fn start_env(env: Vec<(String, String)>) -> Farm {
        let db = TestDb::new().await;
        let dir = tempfile::tempdir().unwrap();
        let redis = RedisServer::start();
        let config = write(dir.path(), "flowfarm.toml", &coordinator_config());
        let results = dir.path().join("results");
        let server = Server::start_env(&db, &config, &results, &redis.url(), "127.0.0.1:0", &env);
        let (submitter, admin, worker_token) = (token(&db, "submit", "alice"), token(&db, "admin", "ops"), token(&db, "worker", "fleet"));
        Farm { db, dir, redis, server: Some(server), config, results, submitter, admin, worker_token, env }
    }

    fn url(&self) -> String {
        self.server.as_ref().expect("coordinator running").url()
    }

    fn restart_coordinator(&mut self) {
        let server = self.server.take().expect("coordinator running");
        let addr = server.addr.to_string();
        server.stop();
        self.server = Some(Server::start_env(&self.db, &self.config, &self.results, &self.redis.url(), &addr, &self.env));
    }

    fn worker(&self, name: &str) -> Worker {
        self.worker_serving(name, &format!("path = \"{}\"\n", repo_path("models/flowfarm-tiny").display()))
    }

    /// A worker whose `[[models]]` entry for the model is `name` plus `entry` (TOML keys).
    fn worker_serving(&self, name: &str, entry: &str) -> Worker {
        self.worker_configured(name, "", entry)
    }

    /// A worker with `top` among its top-level keys and `entry` in its model's table.
    fn worker_configured(&self, name: &str, top: &str, entry: &str) -> Worker {
        let config = write(
            self.dir.path(),
            &format!("{name}.toml"),
            &format!(
                "name = \"{name}\"\n{}drain_timeout_seconds = 60\n{top}[[models]]\nname = \"{MODEL}\"\n{entry}",
                if top.contains("capacity") { "" } else { "capacity = 1\n" }
            ),
        );
        let log = self.dir.path().join(format!("{name}.log"));
        let metrics = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        let mut env = vec![
            ("FLOWFARM_SERVER", self.url()),
            ("FLOWFARM_TOKEN", self.worker_token.clone()),
            ("FLOWFARM_REDIS_URL", self.redis.url()),
            ("FLOWFARM_RESULTS_DIR", self.results.display().to_string()),
            ("FLOWFARM_METRICS_LISTEN", metrics.to_string()),
        ];
        env.extend(self.env.iter().map(|(k, v)| (k.as_str(), v.clone())));
        Worker { process: WorkerProcess::spawn(&config, &env, log), name: name.to_owned(), metrics }
    }

    fn farmctl(&self, token: &str, args: &[&str]) -> std::process::Output {
        farmctl(&self.url(), token, args)
    }

    /// Submits JSONL lines of `flowfarm-tiny` jobs; returns the batch id.
    fn submit(&self, jobs: &[String]) -> String {
        let path = write(self.dir.path(), &format!("{}.jsonl", Uuid::new_v4()), &(jobs.join("\n") + "\n"));
        let out = ok_json(self.farmctl(&self.submitter, &["--json", "submit", path.to_str().unwrap()]));
        out["batch"]["id"].as_str().unwrap().to_owned()
    }

    async fn scalar<T>(&self, sql: &str) -> T
    where
        T: for<'r> sqlx::Decode<'r, sqlx::Postgres> + sqlx::Type<sqlx::Postgres> + Send + Unpin,
    {
        sqlx::query_scalar(sql).fetch_one(self.db.store.pool()).await.unwrap()
    }

    async fn count(&self, sql: &str) -> i64 {
        self.scalar::<i64>(sql).await
    }

    /// Waits until `done` says so, polling every 100 ms; panics with
    /// `what` and the workers' logs after `limit`.
    async fn wait_for(&self, what: &str, limit: Duration, workers: &[&Worker], mut done: impl AsyncFnMut() -> bool) {
        let deadline = Instant::now() + limit;
        while !done().await {
            if Instant::now() > deadline {
                let states: Vec<(String, i64)> =
                    sqlx::query_as("SELECT state, count(*) FROM jobs GROUP BY state").fetch_all(self.db.store.pool()).await.unwrap();
                let logs: Vec<String> = workers.iter().map(|w| format!("--- {} ---\n{}", w.name, w.log())).collect();
                panic!("timed out waiting for {what}; jobs by state: {states:?}\n{}", logs.join("\n"));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn wait_all_finished(&self, workers: &[&Worker], limit: Duration) {
        self.wait_for("every job to finish", limit, workers, async || {
            self.count("SELECT count(*) FROM jobs WHERE state NOT IN ('succeeded', 'failed', 'cancelled', 'dead')").await == 0
        })
        .await;
    }

    async fn worker_id(&self, name: &str) -> Uuid {
        sqlx::query_scalar("SELECT id FROM workers WHERE name = $1 ORDER BY registered_at DESC LIMIT 1")
            .bind(name)
            .fetch_one(self.db.store.pool())
            .await
            .unwrap()
    }

    /// Every job succeeded once: one `succeeded` event, one result whose
    /// file matches its hash and whose PNG metadata is the job's spec.
    async fn assert_each_succeeded_once(&self) {
        let rows: Vec<SucceededJobRow> = sqlx::query_as(
            "SELECT id, state, prompt, seed, width, height, steps, guidance, shift, result_key, result_sha256, \
             (SELECT count(*)::int4 FROM job_events e WHERE e.job_id = j.id AND e.to_state = 'succeeded') FROM jobs j",
        )
        .fetch_all(self.db.store.pool())
        .await
        .unwrap();
        assert!(!rows.is_empty());
        let mut keys = HashSet::new();
        for (id, state, prompt, seed, width, height, steps, guidance, shift, key, sha, succeeded_events) in rows {
            assert_eq!(state, "succeeded", "job {id}");
            assert_eq!(succeeded_events, 1, "job {id} succeeded {succeeded_events} times");
            assert!(keys.insert(key.clone()), "two jobs share result {key}");
            let bytes = std::fs::read(self.results.join(&key)).unwrap_or_else(|e| panic!("result {key}: {e}"));
            assert_eq!(hex::encode(Sha256::digest(&bytes)), sha, "{key}");
            let p = read_parameters(&bytes).unwrap().unwrap_or_else(|| panic!("{key} has no parameters"));
            assert_eq!(
                (p.prompt.as_str(), p.seed, p.width, p.height, p.steps),
                (prompt.as_str(), seed as u64, width as u32, height as u32, steps as u32)
            );
            assert_eq!((p.guidance, p.shift, p.model.as_str()), (guidance, shift, MODEL));
            let decoded = png::Decoder::new(std::io::Cursor::new(&bytes)).read_info().unwrap();
            assert_eq!((decoded.info().width, decoded.info().height), (width as u32, height as u32));
        }
        let files = walk(&self.results);
        assert_eq!(files.len(), keys.len(), "one file per job and nothing else: {files:?}");
    }
}

/// id, state, prompt, seed, width, height, steps, guidance, shift,
/// result key, result SHA-256, count of `succeeded` events.
type SucceededJobRow = (Uuid, String, String, i64, i32, i32, i32, f32, f64, String, String, i32);

fn job(prompt: &str, seed: u64, steps: u32) -> String {
    format!("{{\"model\":\"{MODEL}\",\"prompt\":\"{prompt}\",\"seed\":{seed},\"steps\":{steps},\"width\":64,\"height\":64}}")
}

fn sheet_pixel(pixels: &[u8], at: usize) -> [u8; 3] {
    [pixels[at], pixels[at + 1], pixels[at + 2]]
}

fn scrape(addr: std::net::SocketAddr) -> String {
    http_get(addr, "/metrics").1
}

/// 200 jobs over two workers: all succeed, each once, both workers work,
/// farmctl fetches every image, and the coordinator's metrics agree.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_render_a_200_job_batch() {
    let farm = Farm::start().await;
    let (a, b) = (farm.worker("a"), farm.worker("b"));
    let jobs: Vec<String> = (0..200).map(|i| job(&format!("shot {}", i % 20), i, 2)).collect();
    let batch = farm.submit(&jobs);
    farm.wait_all_finished(&[&a, &b], Duration::from_secs(600)).await;
    farm.assert_each_succeeded_once().await;

    let done: Vec<(String, i64)> =
        sqlx::query_as("SELECT name, images_done FROM workers ORDER BY name").fetch_all(farm.db.store.pool()).await.unwrap();
    assert_eq!(done.iter().map(|(_, n)| n).sum::<i64>(), 200, "{done:?}");
    assert!(done.iter().all(|(_, n)| *n > 0), "both workers rendered: {done:?}");

    let out = farm.dir.path().join("fetched");
    let fetched = farm
        .farmctl(&farm.submitter, &["results", "fetch", &batch, "--out", out.to_str().unwrap(), "--contact-sheet", "--sheet-cell", "64"]);
    assert!(fetched.status.success(), "{}", String::from_utf8_lossy(&fetched.stderr));
    assert_eq!(walk(&out).len(), 201, "200 images and the contact sheet");
    // 200 images of 64 × 64 on a 15-column grid of 64-pixel cells, 4 pixels apart;
    // the first cell is the first job's image, pixel for pixel.
    let sheet = std::fs::read(out.join("contact-sheet.png")).unwrap();
    let mut reader = png::Decoder::new(std::io::Cursor::new(&sheet)).read_info().unwrap();
    let mut pixels = vec![0; reader.output_buffer_size()];
    reader.next_frame(&mut pixels).unwrap();
    let (width, height) = (reader.info().width, reader.info().height);
    assert_eq!((width, height), (15 * 68 + 4, 14 * 68 + 4));
    let first = walk(&out).into_iter().find(|p| p.file_name().unwrap().to_string_lossy().starts_with("00000-")).unwrap();
    let mut reader = png::Decoder::new(std::io::Cursor::new(std::fs::read(first).unwrap())).read_info().unwrap();
    let mut image = vec![0; reader.output_buffer_size()];
    reader.next_frame(&mut image).unwrap();
    let channels = image.len() / (64 * 64);
    for (x, y) in [(0usize, 0usize), (31, 17), (63, 63)] {
        let at_sheet = ((4 + y) * width as usize + 4 + x) * 3;
        let at_image = (y * 64 + x) * channels;
        assert_eq!(sheet_pixel(&pixels, at_sheet), sheet_pixel(&image, at_image), "pixel ({x}, {y})");
    }

    let workers = ok_json(farm.farmctl(&farm.admin, &["--json", "workers", "list"]));
    let listed: i64 = workers.as_array().unwrap().iter().map(|w| w["images_done"].as_i64().unwrap_or(0)).sum();
    assert_eq!(listed, 200, "{workers}");

    let top = farm.farmctl(&farm.admin, &["top", "--once"]);
    let text = String::from_utf8_lossy(&top.stdout);
    assert!(top.status.success() && text.contains("succeeded 200") && text.contains("workers: 2"), "{text}");
    assert!(text.contains("gpu-seconds by submitter: alice "), "{text}");

    // GPU time counted once: the batch's total is what the workers were credited.
    let shown = ok_json(farm.farmctl(&farm.submitter, &["--json", "batch", &batch]));
    let batch_seconds = shown["gpu_seconds"].as_f64().unwrap();
    let credited: f64 = workers.as_array().unwrap().iter().map(|w| w["gpu_seconds"].as_f64().unwrap_or(0.0)).sum();
    assert!(batch_seconds > 0.0 && (batch_seconds - credited).abs() < 1e-6, "batch {batch_seconds} s, workers {credited} s");

    let metrics = scrape(farm.server.as_ref().unwrap().metrics.expect("metrics served"));
    assert!(metrics.contains(&format!("flowfarm_jobs{{model=\"{MODEL}\",state=\"succeeded\"}} 200")), "{metrics}");
    assert!(metrics.contains("flowfarm_workers{state=\"active\"} 2"), "{metrics}");
    assert!(metrics.contains("flowfarm_submit_to_start_seconds_count 200"), "{metrics}");
    assert!(metrics.contains("flowfarm_jobs_completed_total 200"), "{metrics}");

    // Each worker encoded each of the 20 prompts (and the empty negative) at most once.
    let mut succeeded = 0;
    for w in [&a, &b] {
        let text = scrape(w.metrics);
        let value = |name: &str| -> f64 {
            text.lines().find_map(|l| l.strip_prefix(name)?.trim().parse().ok()).unwrap_or_else(|| panic!("{name} in {text}"))
        };
        succeeded += value("flowfarm_worker_jobs_total{outcome=\"succeeded\"}") as i64;
        let misses = value("flowfarm_worker_embedding_cache_misses_total");
        assert!(misses <= 21.0 * 3.0, "{misses} encodes for 21 distinct prompts × 3 encoders");
        assert!(value("flowfarm_worker_embedding_cache_hits_total") > 0.0, "{text}");
    }
    assert_eq!(succeeded, 200);
}

/// One worker process driving two CPU devices (a replica of the model on
/// each, each device on its own share of the cores) renders a 40-job batch:
/// both devices render, ListWorkers reports each with its counters, and a
/// job renders to the same bytes whichever device takes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_renders_on_each_of_its_devices() {
    let farm = Farm::start().await;
    let model = format!("path = \"{}\"\n", repo_path("models/flowfarm-tiny").display());
    let duo = farm.worker_configured("duo", "devices = [\"cpu:0\", \"cpu:1\"]\n", &model);
    // Jobs 20..39 repeat 0..19: the same spec, rendered twice.
    let jobs: Vec<String> = (0..40).map(|i| job(&format!("pair {}", i % 20), i % 20, 2)).collect();
    farm.submit(&jobs);
    farm.wait_all_finished(&[&duo], Duration::from_secs(600)).await;
    farm.assert_each_succeeded_once().await;
    let pairs: Vec<(String, i64, String)> =
        sqlx::query_as("SELECT prompt, seed, result_sha256 FROM jobs ORDER BY prompt, seed").fetch_all(farm.db.store.pool()).await.unwrap();
    for pair in pairs.chunks(2) {
        assert_eq!(pair[0], pair[1], "the same job, the same bytes");
    }

    // The counters arrive with heartbeats (every second here).
    let deadline = Instant::now() + Duration::from_secs(30);
    let devices = loop {
        let listed = ok_json(farm.farmctl(&farm.admin, &["--json", "workers", "list"]));
        let worker = listed.as_array().unwrap()[0].clone();
        assert_eq!(worker["capacity"], 2, "a slot per device: {worker}");
        let devices = worker["devices"].as_array().unwrap().clone();
        let done: u64 = devices.iter().map(|d| d["images_done"].as_u64().unwrap()).sum();
        if done == 40 || Instant::now() > deadline {
            break devices;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let names: Vec<&str> = devices.iter().map(|d| d["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["cpu:0", "cpu:1"]);
    let done: Vec<u64> = devices.iter().map(|d| d["images_done"].as_u64().unwrap()).collect();
    assert_eq!(done.iter().sum::<u64>(), 40, "{devices:?}");
    assert!(done.iter().all(|&n| n > 0), "both devices rendered: {done:?}");
    assert!(devices.iter().all(|d| d["busy_seconds"].as_f64().unwrap() > 0.0), "{devices:?}");
    let text = farm.farmctl(&farm.admin, &["workers", "list"]);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("cpu:0") && text.contains("cpu:1"), "{text}");
    let metrics = scrape(duo.metrics);
    for device in ["cpu:0", "cpu:1"] {
        assert!(metrics.contains(&format!("flowfarm_worker_device_busy_seconds_total{{device=\"{device}\"}}")), "{metrics}");
    }
}

/// A worker over two CPU devices renders each job across both, as its
/// model's `parallel` says — CFG pairs (one job at a time per pair) or a
/// block pipeline (`capacity` jobs per device in flight through the
/// blocks) — and the result is the one-device image, byte for byte. Each
/// device counts every image it took part in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_splits_each_job_across_its_devices_in_cfg_and_pipeline_modes() {
    for (mode, slots) in [("cfg", 2), ("pipeline", 4)] {
        let farm = Farm::start().await;
        let model = repo_path("models/flowfarm-tiny");
        // The mode is the model's own; the worker's default stays replicate.
        let entry = format!("path = \"{}\"\nparallel = \"{mode}\"\n", model.display());
        let worker = farm.worker_configured(mode, "devices = [\"cpu:0\", \"cpu:1\"]\ncapacity = 2\n", &entry);
        let jobs: Vec<String> = (0..8).map(|i| job(&format!("{mode} {i}"), i, 3)).collect();
        farm.submit(&jobs);
        farm.wait_all_finished(&[&worker], Duration::from_secs(300)).await;
        farm.assert_each_succeeded_once().await;

        let (key, guidance, shift): (String, f32, f64) =
            sqlx::query_as("SELECT result_key, guidance, shift FROM jobs WHERE idx = 0").fetch_one(farm.db.store.pool()).await.unwrap();
        let alone = farm.dir.path().join("alone.png");
        let out = Command::new(flowfarm_bin())
            .args(["model", "render", "--model"])
            .arg(&model)
            .args(["--prompt", &format!("{mode} 0"), "--seed", "0", "--steps", "3", "--width", "64", "--height", "64"])
            .args(["--guidance", &guidance.to_string(), "--shift", &shift.to_string(), "--out"])
            .arg(&alone)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let pixels = |path: &std::path::Path| {
            let mut reader = png::Decoder::new(std::io::Cursor::new(std::fs::read(path).unwrap())).read_info().unwrap();
            let mut buffer = vec![0; reader.output_buffer_size()];
            reader.next_frame(&mut buffer).unwrap();
            buffer
        };
        assert_eq!(pixels(&farm.results.join(&key)), pixels(&alone), "{mode} on the farm gives the one-device image");

        let deadline = Instant::now() + Duration::from_secs(30);
        let worker = loop {
            let listed = ok_json(farm.farmctl(&farm.admin, &["--json", "workers", "list"]));
            let worker = listed.as_array().unwrap()[0].clone();
            let done: Vec<u64> = worker["devices"].as_array().unwrap().iter().map(|d| d["images_done"].as_u64().unwrap()).collect();
            if done == [8, 8] || Instant::now() > deadline {
                break worker;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        assert_eq!(worker["capacity"], slots, "{mode}: {worker}");
        let names: Vec<&str> = worker["devices"].as_array().unwrap().iter().map(|d| d["name"].as_str().unwrap()).collect();
        assert_eq!(names, ["cpu:0", "cpu:1"], "{worker}");
        let done: Vec<u64> = worker["devices"].as_array().unwrap().iter().map(|d| d["images_done"].as_u64().unwrap()).collect();
        assert_eq!(done, [8, 8], "{mode}: both devices took part in every image: {worker}");
        let placement = &worker["placements"][MODEL];
        assert_eq!(
            (placement["parallel"].as_str(), placement["units"].clone()),
            (Some(mode), serde_json::json!(["cpu:0+cpu:1"])),
            "{worker}"
        );
        let listed = farm.farmctl(&farm.admin, &["workers", "list"]);
        let text = String::from_utf8_lossy(&listed.stdout);
        assert!(text.contains(&format!("({mode} on cpu:0+cpu:1)")), "the mode shows in the list: {text}");
    }
}

/// Cross-job batches: jobs of one model, size and encoder set are sampled
/// together, each with its own prompt, seed, shift, guidance and step
/// count, and each PNG is byte for byte the one the job renders alone; a
/// job cancelled in mid-batch leaves it without changing the others' images.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_batches_compatible_jobs_and_each_png_is_the_one_rendered_alone() {
    let farm = Farm::start().await;
    let spec = |prompt: &str, seed: u64, steps: u32, shift: f64, guidance: f64| {
        format!(
            "{{\"model\":\"{MODEL}\",\"prompt\":\"{prompt}\",\"seed\":{seed},\"steps\":{steps},\"width\":64,\"height\":64,\"shift\":{shift},\"guidance_scale\":{guidance}}}"
        )
    };
    let kept = [spec("a red circle", 11, 24, 3.0, 5.0), spec("a blue square", 12, 30, 1.5, 7.0), spec("a green field", 13, 36, 6.0, 1.0)];
    let results_of = async |batch: &str| -> Vec<Option<Vec<u8>>> {
        let keys: Vec<Option<String>> = sqlx::query_scalar(&format!("SELECT result_key FROM jobs WHERE batch_id = '{batch}' ORDER BY idx"))
            .fetch_all(farm.db.store.pool())
            .await
            .unwrap();
        keys.into_iter().map(|k| k.map(|k| std::fs::read(farm.results.join(k)).unwrap())).collect()
    };

    // Alone: one job per render.
    let alone = farm.worker("alone");
    let alone_batch = farm.submit(&kept);
    farm.wait_all_finished(&[&alone], Duration::from_secs(300)).await;
    signal(&alone.process.child, "TERM");
    farm.wait_for("worker alone to leave", Duration::from_secs(60), &[&alone], async || {
        farm.count("SELECT count(*) FROM workers WHERE name = 'alone' AND state = 'gone'").await == 1
    })
    .await;

    // Batched: a long job holds the only slot while the next four wait in
    // the stream, so one read brings them all.
    let entry = format!("path = \"{}\"\n", repo_path("models/flowfarm-tiny").display());
    let batched = farm.worker_configured("batched", "max_batch = 4\n", &entry);
    farm.submit(&[job("blocker", 1, 80)]);
    farm.wait_for("the blocker to render", Duration::from_secs(120), &[&batched], async || {
        farm.count("SELECT count(*) FROM jobs WHERE prompt = 'blocker' AND state = 'running' AND progress_step >= 1").await == 1
    })
    .await;
    let mut together: Vec<String> = kept.to_vec();
    together.push(spec("cancel me", 14, 200, 3.0, 5.0));
    let together = farm.submit(&together);
    farm.wait_for("the four to wait in the stream", Duration::from_secs(60), &[&batched], async || {
        farm.count(&format!("SELECT count(*) FROM jobs WHERE batch_id = '{together}' AND state = 'dispatched'")).await == 4
    })
    .await;
    assert_eq!(
        farm.count("SELECT count(*) FROM jobs WHERE prompt = 'blocker' AND state = 'running'").await,
        1,
        "the four were dispatched while the blocker rendered"
    );
    farm.wait_for("the batch to be at step 3", Duration::from_secs(120), &[&batched], async || {
        farm.count(&format!("SELECT count(*) FROM jobs WHERE batch_id = '{together}' AND state = 'running' AND progress_step >= 3")).await
            == 4
    })
    .await;
    let victim: Uuid = farm.scalar(&format!("SELECT id FROM jobs WHERE batch_id = '{together}' AND idx = 3")).await;
    let cancelled = farm.farmctl(&farm.submitter, &["jobs", "cancel", &victim.to_string()]);
    assert!(cancelled.status.success(), "{}", String::from_utf8_lossy(&cancelled.stderr));
    assert_eq!(
        farm.count(&format!("SELECT count(*) FROM jobs WHERE batch_id = '{together}' AND state = 'running' AND idx < 3")).await,
        3,
        "the others were still rendering when it was cancelled"
    );
    farm.wait_all_finished(&[&batched], Duration::from_secs(300)).await;
    farm.wait_for("the worker to drop the cancelled job", Duration::from_secs(60), &[&batched], async || {
        batched.log().contains("stopped: the job is no longer")
    })
    .await;

    let (alone, together) = (results_of(&alone_batch).await, results_of(&together).await);
    for i in 0..3 {
        let (a, b) = (alone[i].as_ref().expect("rendered alone"), together[i].as_ref().expect("rendered in the batch"));
        assert!(a == b, "job {i}: the batched PNG differs from the one rendered alone");
    }
    assert!(together[3].is_none(), "the cancelled job has no image");
    assert_eq!(farm.scalar::<String>(&format!("SELECT state FROM jobs WHERE id = '{victim}'")).await, "cancelled");
    // Two renders: the blocker alone, then the four together.
    let metrics = scrape(batched.metrics);
    let value = |name: &str| -> f64 {
        let line = metrics.lines().find(|l| l.starts_with(name)).unwrap_or_else(|| panic!("no {name} in\n{metrics}"));
        line.rsplit(' ').next().and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("{line}"))
    };
    assert_eq!((value("flowfarm_worker_render_jobs_count"), value("flowfarm_worker_render_jobs_sum")), (2.0, 5.0), "{metrics}");
    let listed = ok_json(farm.farmctl(&farm.admin, &["--json", "workers", "list"]));
    let worker = listed.as_array().unwrap().iter().find(|w| w["name"] == "batched").unwrap().clone();
    assert_eq!(worker["capacity"], 4, "a batch of max_batch in its one slot: {worker}");
    assert_eq!(worker["placements"][MODEL]["max_batch"], 4, "{worker}");
}

/// A model that does not fit its devices is refused at start, naming the
/// device, the need and the memory it has.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_whose_model_does_not_fit_is_refused_at_start() {
    let farm = Farm::start().await;
    // SD3.5-large's shapes (its configs; no weights need be here): in F32
    // with its encoders, each replica needs ~75 GB, more than half of any
    // host this runs on.
    let entry = format!("path = \"{}\"\n", repo_path("crates/flowfarm-engine/tests/fixtures/configs/sd3.5-large").display());
    let mut worker = farm.worker_configured("huge", "devices = [\"cpu:0\", \"cpu:1\"]\n", &entry);
    let status = worker.process.child.wait().unwrap();
    let log = worker.process.log();
    assert!(!status.success(), "{log}");
    assert!(log.contains("does not fit") && log.contains("cpu:0 needs") && log.contains("flowfarm model plan"), "{log}");
}

/// kill -9 of a worker in mid-render: after its lease expires the job runs
/// again on the other worker, as attempt 2, with one result.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_workers_job_finishes_on_the_other() {
    let farm = Farm::start().await;
    let mut a = farm.worker("a");
    let jobs: Vec<String> = (0..4).map(|i| job("slow", i, 60)).collect();
    farm.submit(&jobs);
    let a_id = farm.worker_id_when_registered("a", &[&a]).await;
    farm.wait_for("worker a to be rendering", Duration::from_secs(120), &[&a], async || {
        farm.count(&format!("SELECT count(*) FROM jobs WHERE state = 'running' AND worker_id = '{a_id}' AND progress_step >= 2")).await == 1
    })
    .await;
    let victim: Uuid = farm.scalar(&format!("SELECT id FROM jobs WHERE state = 'running' AND worker_id = '{a_id}'")).await;
    signal(&a.process.child, "KILL");
    a.process.child.wait().unwrap();
    let b = farm.worker("b");
    farm.wait_all_finished(&[&b], Duration::from_secs(300)).await;
    farm.assert_each_succeeded_once().await;
    let (attempt, worker): (i32, Uuid) =
        sqlx::query_as("SELECT attempt, worker_id FROM jobs WHERE id = $1").bind(victim).fetch_one(farm.db.store.pool()).await.unwrap();
    assert_eq!(attempt, 2, "the killed attempt was the first");
    assert_eq!(worker, farm.worker_id("b").await);
    let expired = farm.count(&format!("SELECT count(*) FROM job_events WHERE job_id = '{victim}' AND reason = 'lease expired'")).await;
    assert_eq!(expired, 1);
}

/// Redis loses everything (FLUSHALL), then goes away for a second and
/// comes back empty, then the coordinator restarts, all in mid-batch: the
/// batch completes with nothing lost or done twice, and `farmctl watch`,
/// running all along, follows it to the end across the restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_flush_and_coordinator_restart_lose_nothing() {
    let mut farm = Farm::start().await;
    let (a, b) = (farm.worker("a"), farm.worker("b"));
    let jobs: Vec<String> = (0..60).map(|i| job(&format!("p{}", i % 7), i, 4)).collect();
    let batch = farm.submit(&jobs);
    let watch = Command::new(farmctl_bin())
        .args(["--json", "watch", &batch])
        .env("FLOWFARM_SERVER", farm.url())
        .env("FLOWFARM_TOKEN", &farm.submitter)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start farmctl watch");
    farm.wait_for("10 jobs done", Duration::from_secs(300), &[&a, &b], async || {
        farm.count("SELECT count(*) FROM jobs WHERE state = 'succeeded'").await >= 10
    })
    .await;
    assert_eq!(farm.redis.cli(&["FLUSHALL"]).trim(), "OK");
    farm.wait_for("20 jobs done", Duration::from_secs(300), &[&a, &b], async || {
        farm.count("SELECT count(*) FROM jobs WHERE state = 'succeeded'").await >= 20
    })
    .await;
    farm.redis.restart(Duration::from_secs(1));
    farm.wait_for("30 jobs done", Duration::from_secs(300), &[&a, &b], async || {
        farm.count("SELECT count(*) FROM jobs WHERE state = 'succeeded'").await >= 30
    })
    .await;
    farm.restart_coordinator();
    farm.wait_all_finished(&[&a, &b], Duration::from_secs(600)).await;
    farm.assert_each_succeeded_once().await;

    let watched = tokio::task::spawn_blocking(move || watch.wait_with_output()).await.unwrap().unwrap();
    let stderr = String::from_utf8_lossy(&watched.stderr);
    assert!(watched.status.success(), "farmctl watch did not follow the batch across the restart: {stderr}");
    // Every job's end seen once: the reconnection resumed at its cursor.
    let stdout = String::from_utf8_lossy(&watched.stdout);
    let finished: Vec<serde_json::Value> = stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v.get("state_change").cloned())
        .filter(|e| e["to"] == "succeeded")
        .collect();
    let jobs: HashSet<&str> = finished.iter().filter_map(|e| e["job_id"].as_str()).collect();
    assert_eq!((finished.len(), jobs.len()), (60, 60), "{stdout}");
}

/// Cancelling a running job stops its worker at the next sampling step;
/// the job ends cancelled and the worker goes on with other work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_a_running_job_stops_it_at_the_next_step() {
    let farm = Farm::start().await;
    let a = farm.worker("a");
    let batch = farm.submit(&[job("long", 1, 200)]);
    // Step progress reaches watchers from the worker's reports.
    let channel = tonic::transport::Channel::from_shared(farm.url()).unwrap().connect().await.unwrap();
    let mut render = RenderServiceClient::with_interceptor(channel, flowfarm_testkit::Auth::new(&farm.submitter).unwrap());
    let mut events =
        render.watch_batch(pb::WatchBatchRequest { batch_id: batch.clone(), ..Default::default() }).await.unwrap().into_inner();
    let progress = loop {
        match events.message().await.unwrap().and_then(|e| e.event) {
            Some(pb::watch_batch_event::Event::Progress(p)) if p.step >= 1 => break p,
            Some(_) => continue,
            None => panic!("the watch ended without progress"),
        }
    };
    assert_eq!((progress.attempt, progress.total_steps), (1, 200));
    farm.wait_for("the job to be at step 3", Duration::from_secs(120), &[&a], async || {
        farm.count("SELECT count(*) FROM jobs WHERE state = 'running' AND progress_step >= 3").await == 1
    })
    .await;
    let cancelled = farm.farmctl(&farm.submitter, &["jobs", "cancel", "--batch", &batch]);
    assert!(cancelled.status.success(), "{}", String::from_utf8_lossy(&cancelled.stderr));
    // Reports are refused from here on: this is the last step recorded.
    let step_at_cancel: i32 = farm.scalar("SELECT progress_step FROM jobs").await;
    farm.wait_for("the worker to stop", Duration::from_secs(60), &[&a], async || a.log().contains("stopped: the job is no longer")).await;
    let log = a.log();
    let line = log.lines().find(|l| l.contains("stopped: the job is no longer")).unwrap();
    let stopped_at: i32 = line.split("step=").nth(1).and_then(|s| s.split_whitespace().next()).and_then(|s| s.parse().ok()).expect(line);
    assert!(stopped_at <= step_at_cancel + 1, "stopped at step {stopped_at}, cancelled at {step_at_cancel}");
    assert!(stopped_at < 200);
    assert_eq!(farm.scalar::<String>("SELECT state FROM jobs").await, "cancelled");
    // The worker is free again.
    farm.submit(&[job("after", 2, 2)]);
    farm.wait_all_finished(&[&a], Duration::from_secs(120)).await;
    assert_eq!(farm.count("SELECT count(*) FROM jobs WHERE state = 'succeeded'").await, 1);
    assert!(walk(&farm.results).len() == 1, "no image for the cancelled job");
}

/// Drain: the job in flight finishes, the worker deregisters and exits 0,
/// its queued work goes to another worker; SIGTERM drains the same way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drained_worker_finishes_its_job_and_exits_zero() {
    let farm = Farm::start().await;
    let mut a = farm.worker("a");
    let jobs: Vec<String> = (0..5).map(|i| job("drain", i, 40)).collect();
    farm.submit(&jobs);
    let a_id = farm.worker_id_when_registered("a", &[&a]).await;
    farm.wait_for("worker a to be rendering", Duration::from_secs(120), &[&a], async || {
        farm.count(&format!("SELECT count(*) FROM jobs WHERE state = 'running' AND worker_id = '{a_id}'")).await == 1
    })
    .await;
    let in_flight: Uuid = farm.scalar(&format!("SELECT id FROM jobs WHERE state = 'running' AND worker_id = '{a_id}'")).await;
    let drained = farm.farmctl(&farm.admin, &["workers", "drain", &a_id.to_string()]);
    assert!(drained.status.success(), "{}", String::from_utf8_lossy(&drained.stderr));
    let status = a.process.child.wait().unwrap();
    assert!(status.success(), "drained worker exited with {status}\n{}", a.log());
    assert_eq!(farm.scalar::<String>(&format!("SELECT state FROM jobs WHERE id = '{in_flight}'")).await, "succeeded");
    assert_eq!(farm.scalar::<String>(&format!("SELECT state FROM workers WHERE id = '{a_id}'")).await, "gone");

    let mut b = farm.worker("b");
    farm.wait_all_finished(&[&b], Duration::from_secs(300)).await;
    farm.assert_each_succeeded_once().await;

    // Cordoned: up, but given nothing; uncordoned: back to work.
    let b_id = farm.worker_id("b").await;
    assert!(farm.farmctl(&farm.admin, &["workers", "cordon", &b_id.to_string()]).status.success());
    farm.wait_for("b to see the cordon", Duration::from_secs(30), &[&b], async || b.log().contains("to=Cordoned")).await;
    farm.submit(&[job("cordoned", 100, 2), job("cordoned", 101, 2)]);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(farm.count("SELECT count(*) FROM jobs WHERE state = 'queued'").await, 2, "a cordoned worker takes nothing");
    assert!(farm.farmctl(&farm.admin, &["workers", "uncordon", &b_id.to_string()]).status.success());
    farm.wait_all_finished(&[&b], Duration::from_secs(120)).await;
    farm.assert_each_succeeded_once().await;

    signal(&b.process.child, "TERM");
    let status = b.process.child.wait().unwrap();
    assert!(status.success(), "SIGTERM: worker exited with {status}\n{}", b.log());
    assert_eq!(farm.scalar::<String>(&format!("SELECT state FROM workers WHERE id = '{b_id}'")).await, "gone");
}

/// A paused queue dispatches nothing; on resume, a job whose priority was
/// raised while it waited is dispatched and started first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_holds_everything_and_raised_priority_goes_first() {
    let farm = Farm::start().await;
    assert!(farm.farmctl(&farm.admin, &["queue", "pause"]).status.success());
    let a = farm.worker("a");
    farm.worker_id_when_registered("a", &[&a]).await;
    let jobs: Vec<String> = (0..6).map(|i| job("paused", i, 2)).collect();
    farm.submit(&jobs);
    // Several dispatcher periods (0.2 s) pass: nothing may move.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(farm.count("SELECT count(*) FROM jobs WHERE state <> 'queued'").await, 0);
    assert_eq!(farm.redis.cli(&["XLEN", &format!("ff:jobs:{MODEL}")]).trim(), "0");

    let last: Uuid = farm.scalar("SELECT id FROM jobs ORDER BY idx DESC LIMIT 1").await;
    let raised = farm.farmctl(&farm.admin, &["jobs", "priority", "100", &last.to_string()]);
    assert!(raised.status.success(), "{}", String::from_utf8_lossy(&raised.stderr));
    assert!(farm.farmctl(&farm.admin, &["queue", "resume"]).status.success());
    farm.wait_all_finished(&[&a], Duration::from_secs(300)).await;
    let first_started: Uuid = farm.scalar("SELECT job_id FROM job_events WHERE to_state = 'running' ORDER BY id LIMIT 1").await;
    assert_eq!(first_started, last);
}

impl Farm {
    async fn worker_id_when_registered(&self, name: &str, workers: &[&Worker]) -> Uuid {
        self.wait_for(&format!("worker {name} to register"), Duration::from_secs(120), workers, async || {
            self.count(&format!("SELECT count(*) FROM workers WHERE name = '{name}'")).await == 1
        })
        .await;
        self.worker_id(name).await
    }
}

/// Results in an S3-compatible bucket: workers write there, GetResult reads
/// from there, and nothing lands in the local results folder.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_can_live_in_an_s3_bucket() {
    let s3 = S3Server::start("renders");
    let farm = Farm::start_env(s3.env("s3://renders/farm")).await;
    let worker = farm.worker("s3-worker");
    let jobs: Vec<String> = (0..6).map(|i| job(&format!("a bucket of paint {i}"), i, 4)).collect();
    let batch = farm.submit(&jobs);
    farm.wait_all_finished(&[&worker], Duration::from_secs(120)).await;

    let rows: Vec<(Uuid, String, String, String)> =
        sqlx::query_as("SELECT id, state, result_key, result_sha256 FROM jobs").fetch_all(farm.db.store.pool()).await.unwrap();
    assert_eq!(rows.len(), 6);
    let out = farm.dir.path().join("fetched");
    let fetched = farm.farmctl(&farm.submitter, &["results", "fetch", &batch, "--out", out.to_str().unwrap()]);
    assert!(fetched.status.success(), "{}", String::from_utf8_lossy(&fetched.stderr));
    let fetched_files = walk(&out);
    assert_eq!(fetched_files.len(), 6, "{fetched_files:?}");
    for (id, state, key, sha) in rows {
        assert_eq!(state, "succeeded", "job {id}");
        let object = s3.root.path().join("renders/farm").join(&key);
        let bytes = std::fs::read(&object).unwrap_or_else(|e| panic!("object {} in the bucket: {e}", object.display()));
        assert_eq!(hex::encode(Sha256::digest(&bytes)), sha, "{key}");
        assert!(read_parameters(&bytes).unwrap().is_some(), "{key} is a flowfarm PNG");
        let through_get_result = fetched_files.iter().find(|f| f.to_string_lossy().contains(&id.to_string())).expect("fetched");
        assert_eq!(std::fs::read(through_get_result).unwrap(), bytes, "GetResult streams the bucket's object");
    }
    assert!(walk(&farm.results).is_empty(), "nothing in the local results folder");
}

fn published(form: &str) -> PathBuf {
    repo_path("crates/flowfarm-engine/tests/fixtures/published").join(form)
}

/// A worker configured with each published form renders a job; the PNG's
/// "Model hash" is the weights' identity that GetJob returns and the worker
/// registered, the same for the same weights in every form.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_render_every_published_form_and_stamp_the_weights() {
    let farm = Farm::start().await;
    let fp16 = published("diffusers-fp16");
    let file = farm.dir.path().join("sd3_incl_clips_t5xxlfp16.safetensors");
    let out = Command::new(flowfarm_bin())
        .args(["model", "convert"])
        .arg(&fp16)
        .args(["--variant", "fp16", "--to", "single-file"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let enc = published("sd35-encoders");
    let forms = [
        ("sharded", format!("path = \"{}\"\n", published("diffusers-sharded").display())),
        ("variant", format!("path = \"{}\"\nvariant = \"fp16\"\n", fp16.display())),
        ("single-file", format!("path = \"{}\"\nsupport = \"{}\"\n", file.display(), fp16.display())),
        (
            "sd35-fp8",
            format!(
                "path = \"{}\"\nsupport = \"{}\"\nclip_l = \"{}\"\nclip_g = \"{}\"\nt5 = \"{}\"\n",
                file.display(),
                fp16.display(),
                enc.join("clip_l.safetensors").display(),
                enc.join("clip_g.safetensors").display(),
                enc.join("t5xxl_fp8_e4m3fn.safetensors").display()
            ),
        ),
    ];
    let mut hashes = Vec::new();
    for (i, (form, entry)) in forms.iter().enumerate() {
        let worker = farm.worker_serving(form, entry);
        let batch = farm.submit(&[job(&format!("a {form} render"), i as u64, 2)]);
        farm.wait_all_finished(&[&worker], Duration::from_secs(120)).await;
        let job_id: Uuid =
            sqlx::query_scalar("SELECT id FROM jobs WHERE batch_id = $1::uuid").bind(&batch).fetch_one(farm.db.store.pool()).await.unwrap();
        let shown = ok_json(farm.farmctl(&farm.submitter, &["--json", "jobs", "show", &job_id.to_string()]));
        assert_eq!(shown["state"], "succeeded", "{form}: {shown}\n{}", worker.log());
        let hash = shown["result"]["model_hash"].as_str().unwrap().to_owned();
        assert_eq!(hash.len(), 64, "{form}: {shown}");
        let bytes = std::fs::read(farm.results.join(shown["result"]["key"].as_str().unwrap())).unwrap();
        let params = read_parameters(&bytes).unwrap().unwrap();
        assert_eq!(params.model_hash.as_deref(), Some(&hash[..10]), "{form}: the PNG names the weights GetJob names");
        let reader = png::Decoder::new(std::io::Cursor::new(&bytes)).read_info().unwrap();
        let summary = reader.info().utf8_text.iter().find(|c| c.keyword == "parameters").unwrap().get_text().unwrap();
        assert!(summary.contains(&format!("Model hash: {}, Model: {MODEL}", &hash[..10])), "{summary}");
        let registered: serde_json::Value = sqlx::query_scalar("SELECT model_hashes FROM workers WHERE name = $1")
            .bind(form)
            .fetch_one(farm.db.store.pool())
            .await
            .unwrap();
        assert_eq!(registered[MODEL], hash.as_str(), "{form}: the worker registered the weights it renders with");
        hashes.push(hash);
        drop(worker);
    }
    assert_ne!(hashes[0], hashes[1], "the bundled weights and their float16 rounding are different weights");
    assert_eq!(hashes[1], hashes[2], "the same float16 weights as a folder and as a single file");
    assert_ne!(hashes[2], hashes[3], "float8 T5 is other weights");
    let listed = ok_json(farm.farmctl(&farm.admin, &["--json", "workers", "list", "--all"]));
    assert!(listed.to_string().contains(&hashes[0]), "ListWorkers shows the weights: {listed}");
}

/// A worker refuses to start on a model with a shard missing, naming the
/// file, instead of registering and failing jobs.
#[test]
fn a_worker_refuses_a_model_with_a_missing_shard() {
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("partial-download");
    let status = Command::new("cp").arg("-r").arg(published("diffusers-sharded")).arg(&copy).status().unwrap();
    assert!(status.success());
    std::fs::remove_file(copy.join("text_encoder_3/model-00003-of-00003.safetensors")).unwrap();
    let config = write(dir.path(), "worker.toml", &format!("[[models]]\nname = \"{MODEL}\"\npath = \"{}\"\n", copy.display()));
    let out = Command::new(flowfarm_bin())
        .arg("worker")
        .arg("--worker-config")
        .arg(&config)
        .env("FLOWFARM_TOKEN", "unused: the worker stops before it connects")
        .env("FLOWFARM_SERVER", "http://127.0.0.1:1")
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains(MODEL) && stderr.contains("model-00003-of-00003.safetensors, which is missing"), "{stderr}");
}

/// Routing by capability, through real Redis lanes: a worker whose model has
/// no T5 renders only CLIP-only jobs; T5 jobs wait, shown as waiting for a
/// worker serving the model with T5, none failed; a worker with T5 then
/// renders them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_reach_only_workers_with_the_encoders_they_need() {
    let farm = Farm::start().await;
    let no_t5 = farm.dir.path().join("flowfarm-tiny-no-t5");
    let status = Command::new("cp").arg("-r").arg(repo_path("models/flowfarm-tiny")).arg(&no_t5).status().unwrap();
    assert!(status.success());
    std::fs::remove_dir_all(no_t5.join("text_encoder_3")).unwrap();
    let clip_worker = farm.worker_serving("clip", &format!("path = \"{}\"\n", no_t5.display()));

    let spec = |i: u64, set: &str| {
        format!("{{\"model\":\"{MODEL}\",\"prompt\":\"shot {i}\",\"seed\":{i},\"steps\":2,\"width\":64,\"height\":64,\"text_encoders\":\"{set}\"}}")
    };
    let jobs: Vec<String> = (0..6).map(|i| spec(i, if i % 2 == 0 { "clip-only" } else { "all" })).collect();
    let path = write(farm.dir.path(), "mixed.jsonl", &(jobs.join("\n") + "\n"));
    let out = farm.farmctl(&farm.submitter, &["submit", path.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // The CLIP-only worker may not have registered yet: a warning then names CLIP-only too.
    assert!(String::from_utf8_lossy(&out.stderr).contains("with text encoders `all`"), "{}", String::from_utf8_lossy(&out.stderr));

    farm.wait_for("the CLIP-only jobs", Duration::from_secs(120), &[&clip_worker], async || {
        farm.count("SELECT count(*) FROM jobs WHERE text_encoders = 'clip-only' AND state = 'succeeded'").await == 3
    })
    .await;
    let top = farm.farmctl(&farm.admin, &["top", "--once"]);
    let text = String::from_utf8_lossy(&top.stdout);
    assert!(text.contains(&format!("3 job(s) waiting for a worker serving {MODEL} with text encoders all")), "{text}");
    assert_eq!(farm.count("SELECT count(*) FROM jobs WHERE state IN ('failed', 'dead')").await, 0, "nothing failed for want of T5");
    assert_eq!(
        farm.count(
            "SELECT count(*) FROM job_events WHERE to_state = 'running' AND job_id IN (SELECT id FROM jobs WHERE text_encoders = 'all')"
        )
        .await,
        0
    );

    let full_worker = farm.worker("full");
    farm.wait_all_finished(&[&clip_worker, &full_worker], Duration::from_secs(120)).await;
    farm.assert_each_succeeded_once().await;
    let clip_id = farm.worker_id("clip").await;
    let t5_on_clip: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs WHERE text_encoders = 'all' AND worker_id = $1")
        .bind(clip_id)
        .fetch_one(farm.db.store.pool())
        .await
        .unwrap();
    assert_eq!(t5_on_clip, 0, "no T5 job ran on the worker without T5");
}

/// Step progress reaches watchers on every coordinator: the worker reports
/// to coordinator A, a client watches through coordinator B (Postgres
/// notifications carry the steps between them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn progress_reaches_watchers_on_another_coordinator() {
    let farm = Farm::start().await;
    let b = Server::start_env(&farm.db, &farm.config, &farm.results, &farm.redis.url(), "127.0.0.1:0", &farm.env);
    let worker = farm.worker("a-only");
    let batch = farm.submit(&[job("a slow one", 1, 40)]);
    let channel = tonic::transport::Channel::from_shared(b.url()).unwrap().connect().await.unwrap();
    let mut client = RenderServiceClient::with_interceptor(channel, flowfarm_testkit::Auth::new(&farm.submitter).unwrap());
    let mut stream = client.watch_batch(pb::WatchBatchRequest { batch_id: batch, ..Default::default() }).await.unwrap().into_inner();
    let mut steps = Vec::new();
    let mut snapshots = 0;
    while let Some(message) =
        tokio::time::timeout(Duration::from_secs(120), tokio_stream::StreamExt::next(&mut stream)).await.expect("watch stalled")
    {
        match message.unwrap().event {
            Some(pb::watch_batch_event::Event::Progress(p)) => steps.push(p.step),
            Some(pb::watch_batch_event::Event::Snapshot(_)) => snapshots += 1,
            _ => {}
        }
    }
    assert_eq!(snapshots, 2, "a first and a final snapshot\n{}", worker.log());
    assert!(steps.len() >= 10, "steps reported to A seen through B: {steps:?}");
    assert!(steps.windows(2).all(|w| w[0] <= w[1]), "in order: {steps:?}");
    b.stop();
}

/// The status line and body of a GET on a worker's HTTP port.
fn http_get(addr: std::net::SocketAddr, path: &str) -> (String, String) {
    use std::io::{Read, Write};
    let Ok(mut stream) = std::net::TcpStream::connect(addr) else { return ("no answer".into(), String::new()) };
    write!(stream, "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
    let mut text = String::new();
    let _ = stream.read_to_string(&mut text);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    (head.lines().next().unwrap_or_default().to_owned(), body.to_owned())
}

/// A worker's probes: `/healthz` answers while it lives; `/readyz` is 200
/// once it is registered and 503 while its coordinator does not answer its
/// heartbeats, 200 again when it does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_probes_follow_the_coordinator() {
    let mut farm = Farm::start().await;
    let worker = farm.worker("probed");
    let wait = |path: &'static str, status: &'static str, limit: Duration| {
        let addr = worker.metrics;
        async move {
            let deadline = Instant::now() + limit;
            loop {
                let (line, body) = http_get(addr, path);
                if line.contains(status) {
                    return body;
                }
                assert!(Instant::now() < deadline, "{path} still `{line}` ({body}), waiting for {status}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    assert_eq!(wait("/healthz", "200", Duration::from_secs(60)).await, "ok\n");
    wait("/readyz", "200", Duration::from_secs(60)).await;

    let addr = farm.server.as_ref().unwrap().addr.to_string();
    farm.server.take().unwrap().stop();
    let body = wait("/readyz", "503", Duration::from_secs(10)).await;
    assert!(body.contains("coordinator did not answer"), "{body}");
    assert!(http_get(worker.metrics, "/healthz").0.contains("200"), "alive all along");
    farm.server = Some(Server::start_env(&farm.db, &farm.config, &farm.results, &farm.redis.url(), &addr, &farm.env));
    wait("/readyz", "200", Duration::from_secs(30)).await;
}

/// Every metric the Grafana dashboard and the Prometheus alert rules of
/// deploy/ name is exported by a running coordinator or worker (after one
/// job, so that every family has been touched), as a scrape shows it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_deploy_names_is_exported() {
    let listed = Command::new("bash").arg(repo_path("deploy/check.sh")).arg("--list-metrics").current_dir(repo_path("")).output().unwrap();
    assert!(listed.status.success(), "{}", String::from_utf8_lossy(&listed.stderr));
    let named: Vec<String> =
        String::from_utf8_lossy(&listed.stdout).lines().map(str::trim).filter(|l| !l.is_empty()).map(str::to_owned).collect();
    assert!(named.len() >= 10, "deploy/ names only {named:?}");

    let farm = Farm::start().await;
    let a = farm.worker("a");
    farm.submit(&[job("a gauge", 1, 2)]);
    farm.wait_all_finished(&[&a], Duration::from_secs(120)).await;
    let coordinator = farm.server.as_ref().unwrap().metrics.expect("metrics served");
    let mut exported = HashSet::new();
    for text in [scrape(coordinator), scrape(a.metrics)] {
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                exported.insert(rest.split_whitespace().next().unwrap_or_default().to_owned());
            }
        }
    }
    // A family `x` is scraped as x, x_total, x_bucket, x_sum, x_count.
    let family = |name: &str| {
        ["_total", "_bucket", "_sum", "_count", "_created"].iter().find_map(|s| name.strip_suffix(s)).unwrap_or(name).to_owned()
    };
    let missing: Vec<&String> = named.iter().filter(|n| !exported.contains(n.as_str()) && !exported.contains(&family(n))).collect();
    assert!(missing.is_empty(), "named in deploy/ but exported by neither: {missing:?}\nexported: {exported:?}");
}

/// The status page: signed out, a browser is sent to sign in; signed in, a
/// token sees the queue, the workers and its batches, and a batch's contact
/// sheet has a thumbnail per image linking to the full PNG; another
/// tenant's batch is not there. Headless Chromium, signed in from a link,
/// draws it from the page's own script while the batch renders and after,
/// and the sheet fills; the last screenshot is kept under the target
/// folder's test artifacts (CARGO_TARGET_TMPDIR).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_shows_the_farm_and_each_batch_as_a_contact_sheet() {
    use std::io::Cursor;

    let farm = Farm::start().await;
    let a = farm.worker("a");
    // A quick job, then three slow ones: the page is looked at in between.
    let mut jobs = vec![format!("{{\"model\":\"{MODEL}\",\"prompt\":\"wide harbour\",\"seed\":7,\"steps\":2,\"width\":96,\"height\":64}}")];
    jobs.extend((0..3).map(|i| job(&format!("lighthouse {i}"), 40 + i, 200)));
    let batch = farm.submit(&jobs);
    let base = farm.server.as_ref().unwrap().status_page.clone().expect("the status page is served");
    let link = format!("{base}/login#token={}&next=/batches/{batch}", farm.submitter);

    // While it renders (the slow jobs take seconds each): the sheet partly
    // filled, jobs still running or queued.
    farm.wait_for("the first image and a job running", Duration::from_secs(120), &[&a], async || {
        farm.count("SELECT count(*) FROM jobs WHERE state = 'succeeded'").await == 1
            && farm.count("SELECT count(*) FROM jobs WHERE state = 'running' AND progress_step >= 1").await == 1
    })
    .await;
    let during = chromium_dom(&link, &farm.dir.path().join("chromium-during"));
    // A slow machine may have finished one more job by the time the page
    // loads; the sheet is still not full and the batch not done.
    let shown = during.matches("<img").count();
    assert!((1..4).contains(&shown), "some finished images on the sheet, not all: {shown}\n{during}");
    assert!(during.contains(&format!("{shown} of 4 done")), "the batch's progress:\n{during}");
    let to_come = ["\">running ", ">queued<", ">dispatched<"];
    assert!(to_come.iter().any(|c| during.contains(c)), "jobs still to come:\n{during}");
    farm.wait_all_finished(&[&a], Duration::from_secs(300)).await;
    let bob = token(&farm.db, "submit", "bob");

    // Signed out: browsers go to the sign-in form, the API says where to go.
    let page = http::request(&base, "GET", "/", &[], b"");
    assert_eq!((page.status, page.header("location")), (303, Some("/login")));
    let api = http::request(&base, "GET", "/api/status", &[], b"");
    assert_eq!(api.status, 401, "{}", api.text());
    assert!(api.text().contains("/login"), "{}", api.text());
    assert_eq!(http::get(&base, "/api/status", &farm.worker_token).status, 403, "not for worker tokens");
    let login = http::request(&base, "GET", "/login", &[], b"");
    assert_eq!(login.header("content-security-policy").map(|c| c.starts_with("default-src 'self'")), Some(true));
    assert_eq!(login.header("x-frame-options"), Some("DENY"));

    // The overview, as the submitter sees it: its batch, nothing of the
    // fleet (admin-only, as ListWorkers and GetQueueStats are).
    let status = http::get(&base, "/api/status", &farm.submitter).json();
    assert_eq!(status["viewer"]["name"], "alice");
    assert_eq!(status["batches"].as_array().map(Vec::len), Some(1), "{status}");
    assert_eq!(
        (status["batches"][0]["id"].as_str(), status["batches"][0]["counts"]["succeeded"].as_u64()),
        (Some(batch.as_str()), Some(4))
    );
    assert_eq!((&status["queues"], &status["workers"]), (&serde_json::json!([]), &serde_json::json!([])), "{status}");
    // As an admin sees it: the queues and the workers too.
    let for_admin = http::get(&base, "/api/status", &farm.admin).json();
    let queue = for_admin["queues"].as_array().unwrap().iter().find(|q| q["model"] == MODEL).expect("the model's queue");
    assert_eq!(queue["counts"]["succeeded"], 4, "{queue}");
    let worker = &for_admin["workers"][0];
    assert_eq!((worker["name"].as_str(), worker["images_done"].as_u64()), (Some("a"), Some(4)), "{worker}");
    assert!(worker["hostname"].is_string() && worker["current_jobs"].is_array(), "{worker}");
    assert_eq!(http::get(&base, "/api/status", &bob).json()["batches"], serde_json::json!([]), "bob's page lists none of alice's");

    // The batch: every job with its prompt and seed.
    let sheet = http::get(&base, &format!("/api/batches/{batch}"), &farm.submitter).json();
    let listed: Vec<(String, String, bool)> = sheet["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| (j["prompt"].as_str().unwrap().to_owned(), j["seed"].as_str().unwrap().to_owned(), j["image"].as_bool().unwrap()))
        .collect();
    let wanted: Vec<(String, String, bool)> =
        [("wide harbour", "7"), ("lighthouse 0", "40"), ("lighthouse 1", "41"), ("lighthouse 2", "42")]
            .map(|(p, s)| (p.into(), s.into(), true))
            .into();
    assert_eq!(listed, wanted);
    // Another tenant's batch answers as a missing one does.
    let theirs = http::get(&base, &format!("/api/batches/{batch}"), &bob);
    let nobody = Uuid::new_v4().to_string();
    let missing = http::get(&base, &format!("/api/batches/{nobody}"), &bob);
    assert_eq!((theirs.status, missing.status), (404, 404));
    assert_eq!(theirs.text().replace(&batch, "ID"), missing.text().replace(&nobody, "ID"));
    let bad = http::get(&base, "/api/batches/not-a-batch", &farm.submitter);
    assert_eq!(bad.status, 400);
    assert!(bad.text().contains("batch id `not-a-batch` is not a UUID"), "{}", bad.text());

    // The images: the full PNG as recorded, and a thumbnail that fits
    // 192 × 192 (the bundled model's images already do: flowfarm-sheet's
    // tests cover the scaling).
    let rows: Vec<(Uuid, String, i32, i32)> =
        sqlx::query_as("SELECT id, result_sha256, width, height FROM jobs WHERE batch_id = $1::uuid ORDER BY idx")
            .bind(&batch)
            .fetch_all(farm.db.store.pool())
            .await
            .unwrap();
    for (id, sha, width, height) in &rows {
        let image = http::get(&base, &format!("/api/jobs/{id}/image"), &farm.submitter);
        assert_eq!((image.status, image.header("content-type")), (200, Some("image/png")), "{}", image.text());
        assert_eq!(&hex::encode(Sha256::digest(&image.body)), sha, "job {id}: the bytes whose hash was recorded");
        let thumb = http::get(&base, &format!("/api/jobs/{id}/thumbnail"), &farm.submitter);
        let decoded = png::Decoder::new(Cursor::new(&thumb.body)).read_info().unwrap();
        let scale = (192.0 / *width.max(height) as f64).min(1.0);
        let wanted = ((*width as f64 * scale).round() as u32, (*height as f64 * scale).round() as u32);
        assert_eq!((decoded.info().width, decoded.info().height), wanted, "job {id} is {width}×{height}");
        assert_eq!(http::get(&base, &format!("/api/jobs/{id}/image"), &bob).status, 404, "not bob's");
    }

    // A result recorded with another type (before CompleteJob checked it) is a
    // sandboxed download, never a page the browser would run.
    let (first, ..) = &rows[0];
    sqlx::query("UPDATE jobs SET result_content_type = 'text/html' WHERE id = $1").bind(first).execute(farm.db.store.pool()).await.unwrap();
    let odd = http::get(&base, &format!("/api/jobs/{first}/image"), &farm.submitter);
    assert_eq!((odd.header("content-type"), odd.header("content-disposition")), (Some("application/octet-stream"), Some("attachment")));
    assert!(odd.header("content-security-policy").is_some_and(|c| c.starts_with("sandbox")), "{:?}", odd.headers);

    // Signing in with the form: an HttpOnly cookie, then a local redirect only.
    let form = format!("token={}&next=/batches/{batch}", farm.submitter);
    let urlencoded = [("Content-Type", "application/x-www-form-urlencoded")];
    let signed = http::request(&base, "POST", "/login", &urlencoded, form.as_bytes());
    assert_eq!((signed.status, signed.header("location")), (303, Some(format!("/batches/{batch}").as_str())));
    let cookie = signed.header("set-cookie").expect("a sign-in cookie").to_owned();
    assert!(cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"), "{cookie}");
    let pair = cookie.split(';').next().unwrap();
    assert_eq!(http::request(&base, "GET", "/api/status", &[("Cookie", pair)], b"").status, 200);
    let refused = http::request(&base, "POST", "/login", &urlencoded, b"token=fft_00");
    assert_eq!(refused.status, 401);
    assert!(refused.text().contains("unknown, revoked or expired"), "{}", refused.text());
    for elsewhere in ["//elsewhere.example/", "/%09/elsewhere.example", "https://elsewhere.example/"] {
        let away = format!("token={}&next={elsewhere}", farm.submitter);
        assert_eq!(http::request(&base, "POST", "/login", &urlencoded, away.as_bytes()).header("location"), Some("/"), "{elsewhere}");
    }
    // Another site cannot sign a browser in with a token of its choosing.
    let forged = [("Content-Type", "application/x-www-form-urlencoded"), ("Origin", "https://elsewhere.example")];
    let refused = http::request(&base, "POST", "/login", &forged, form.as_bytes());
    assert_eq!((refused.status, refused.header("set-cookie")), (403, None));
    // A page asked for while signed out comes back after sign-in.
    let asked = http::request(&base, "GET", &format!("/batches/{batch}"), &[], b"");
    assert_eq!(asked.header("location"), Some(format!("/login#next=/batches/{batch}").as_str()));

    // A browser: sign in from a link, land on the batch, see its contact
    // sheet filled and the progress moved on; the screenshot stays as an artifact.
    let dom = chromium_dom(&link, &farm.dir.path().join("chromium"));
    assert_eq!(dom.matches("<img").count(), 4, "the sheet filled:\n{dom}");
    assert!(dom.contains("4 of 4 done") && !dom.contains("\">running "), "the progress moved on:\n{dom}");
    let screenshot = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("status-page-batch.png");
    chromium_screenshot(&link, &farm.dir.path().join("chromium-shot"), &screenshot);
    let shot = png::Decoder::new(Cursor::new(std::fs::read(&screenshot).unwrap())).read_info().unwrap();
    assert_eq!((shot.info().width, shot.info().height), (1200, 800));
    println!("status page screenshot: {}", screenshot.display());
    for (id, ..) in &rows {
        assert!(dom.contains(&format!("src=\"/api/jobs/{id}/thumbnail\"")), "no thumbnail of {id} in\n{dom}");
        assert!(dom.contains(&format!("href=\"/api/jobs/{id}/image\"")), "no link to the image of {id} in\n{dom}");
    }
    assert!(dom.contains("alt=\"wide harbour\"") && dom.contains("seed 7"), "prompt and seed on the thumbnail:\n{dom}");
    let overview = chromium_dom(&format!("{base}/login#token={}", farm.admin), &farm.dir.path().join("chromium-admin"));
    assert!(overview.contains(&format!("href=\"/batches/{batch}\"")), "the batch is listed:\n{overview}");
    assert!(overview.contains("<td>a<div") && overview.contains("flowfarm-tiny"), "the worker and the queue:\n{overview}");
}
