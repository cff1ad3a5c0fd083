//! Farm scenarios written once and run against both kinds of farm, through
//! what a user has (farmctl and the API):
//!
//! - `production::`: a `flowfarm coordinator` process over Postgres and its
//!   own Redis, with two `flowfarm worker` processes;
//! - `dev::`: one `flowfarm dev` process (SQLite, in-process queue, two
//!   workers), with Postgres and Redis pointed at closed ports.
//!
//! What only the production farm has (a Redis to flush, worker processes
//! to kill, coordinators to fail over) is tested in `farm.rs` and `chaos.rs`.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::dev::DevFarm;
use common::*;
use flowfarm_engine::png_output::read_parameters;
use flowfarm_testkit::TestDb;
use serde_json::Value;
use uuid::Uuid;

const MODEL: &str = "flowfarm-tiny";

/// A running farm, as its users reach it.
trait Farm {
    fn url(&self) -> String;
    fn admin(&self) -> String;
    fn submitter(&self) -> String;
    fn dir(&self) -> &Path;
}

struct Production {
    _server: Server,
    _workers: Vec<WorkerProcess>,
    _redis: RedisServer,
    _db: TestDb,
    url: String,
    admin: String,
    submitter: String,
    dir: tempfile::TempDir,
}

impl Production {
    async fn start() -> Production {
        let db = TestDb::new().await;
        let dir = tempfile::tempdir().unwrap();
        let redis = RedisServer::start();
        let config = write(dir.path(), "flowfarm.toml", &coordinator_config());
        let results = dir.path().join("results");
        let server = Server::start_with(&db, &config, &results, &redis.url());
        let (submitter, admin, fleet) = (token(&db, "submit", "alice"), token(&db, "admin", "ops"), token(&db, "worker", "fleet"));
        let model = repo_path("models/flowfarm-tiny");
        let workers = ["a", "b"]
            .iter()
            .map(|name| {
                let file = write(
                    dir.path(),
                    &format!("{name}.toml"),
                    &format!("name = \"{name}\"\ncapacity = 1\n[[models]]\nname = \"{MODEL}\"\npath = {model:?}\n"),
                );
                let env = [
                    ("FLOWFARM_SERVER", server.url()),
                    ("FLOWFARM_TOKEN", fleet.clone()),
                    ("FLOWFARM_REDIS_URL", redis.url()),
                    ("FLOWFARM_RESULTS_DIR", results.display().to_string()),
                ];
                WorkerProcess::spawn(&file, &env, dir.path().join(format!("{name}.log")))
            })
            .collect();
        Production { url: server.url(), _server: server, _workers: workers, _redis: redis, _db: db, admin, submitter, dir }
    }
}

impl Farm for Production {
    fn url(&self) -> String {
        self.url.clone()
    }
    fn admin(&self) -> String {
        self.admin.clone()
    }
    fn submitter(&self) -> String {
        self.submitter.clone()
    }
    fn dir(&self) -> &Path {
        self.dir.path()
    }
}

struct Dev {
    farm: DevFarm,
    submitter: String,
    dir: tempfile::TempDir,
}

impl Dev {
    async fn start() -> Dev {
        let dir = tempfile::tempdir().unwrap();
        let farm = DevFarm::start(&dir.path().join("data"), 2, &[]);
        let submitter = make_token(&farm.url, &farm.admin, "alice", "submit");
        Dev { farm, submitter, dir }
    }
}

impl Farm for Dev {
    fn url(&self) -> String {
        self.farm.url.clone()
    }
    fn admin(&self) -> String {
        self.farm.admin.clone()
    }
    fn submitter(&self) -> String {
        self.submitter.clone()
    }
    fn dir(&self) -> &Path {
        self.dir.path()
    }
}

/// A token made through the API by an admin (`farmctl tokens create`).
fn make_token(url: &str, admin: &str, name: &str, role: &str) -> String {
    let made = ok_json(farmctl(url, admin, &["--json", "tokens", "create", "--name", name, "--role", role]));
    made["secret"].as_str().expect("the new token's secret").to_owned()
}

fn job(prompt: &str, seed: u64) -> String {
    format!(r#"{{"model": "{MODEL}", "prompt": "{prompt}", "seed": {seed}, "steps": 2, "width": 64, "height": 64}}"#)
}

fn submit(farm: &dyn Farm, token: &str, jobs: &[String]) -> String {
    let path = write(farm.dir(), &format!("{}.jsonl", Uuid::new_v4()), &(jobs.join("\n") + "\n"));
    let out = ok_json(farmctl(&farm.url(), token, &["--json", "submit", path.to_str().unwrap()]));
    out["batch"]["id"].as_str().unwrap().to_owned()
}

fn batch_jobs(farm: &dyn Farm, token: &str, batch: &str) -> Vec<Value> {
    ok_json(farmctl(&farm.url(), token, &["--json", "jobs", "list", "--batch", batch])).as_array().unwrap().clone()
}

fn states(jobs: &[Value]) -> Vec<String> {
    jobs.iter().map(|j| j["state"].as_str().unwrap().to_owned()).collect()
}

fn watch_to_the_end(farm: &dyn Farm, token: &str, batch: &str) {
    let watched = farmctl(&farm.url(), token, &["watch", batch]);
    assert!(watched.status.success(), "every job succeeded: {}", String::from_utf8_lossy(&watched.stderr));
}

/// A batch renders, each job once, and comes back as images and a contact sheet.
fn a_batch_renders_each_job_once_and_comes_back_with_a_contact_sheet(farm: &dyn Farm) {
    let mut jobs: Vec<String> = (0..24).map(|i| job(&format!("shot {}", i % 6), i)).collect();
    // The first job asks for a tiled VAE decode; the rest leave it to the
    // worker, which decodes whole (as the reference pipeline does).
    jobs[0] = jobs[0].replace("}", r#", "tile_vae": true}"#);
    let submitter = farm.submitter();
    let batch = submit(farm, &submitter, &jobs);
    watch_to_the_end(farm, &submitter, &batch);
    let listed = batch_jobs(farm, &submitter, &batch);
    assert_eq!(states(&listed), vec!["succeeded"; 24]);
    for job in &listed {
        let shown = ok_json(farmctl(&farm.url(), &submitter, &["--json", "jobs", "show", job["id"].as_str().unwrap()]));
        assert_eq!(shown["attempt"], 1, "rendered once: {shown}");
    }
    let out = farm.dir().join(format!("fetched-{batch}"));
    let fetched = farmctl(&farm.url(), &submitter, &["results", "fetch", &batch, "--out", out.to_str().unwrap(), "--contact-sheet"]);
    assert!(fetched.status.success(), "{}", String::from_utf8_lossy(&fetched.stderr));
    assert_eq!(walk(&out).len(), 25, "24 images and the contact sheet");
    for png in walk(&out).into_iter().filter(|p| p.file_name().unwrap() != "contact-sheet.png") {
        let parameters = read_parameters(&std::fs::read(&png).unwrap()).unwrap().expect("render parameters in the PNG");
        let first = png.file_name().unwrap().to_string_lossy().starts_with("00000-");
        let expected = if first { "tiled" } else { "whole" };
        assert_eq!(parameters.vae_decode.as_deref(), Some(expected), "{}", png.display());
    }
    let shown = ok_json(farmctl(&farm.url(), &submitter, &["--json", "batch", &batch]));
    assert_eq!(shown["counts"]["succeeded"], 24, "{shown}");
    let workers = ok_json(farmctl(&farm.url(), &farm.admin(), &["--json", "workers", "list"]));
    let done: i64 = workers.as_array().unwrap().iter().map(|w| w["images_done"].as_i64().unwrap_or(0)).sum();
    assert_eq!(done, 24, "{workers}");
}

/// A paused queue holds new work; a cancel removes it for good; a resume
/// releases what comes after.
fn a_paused_queue_holds_work_that_cancel_removes_and_resume_releases(farm: &dyn Farm) {
    let (admin, submitter) = (farm.admin(), farm.submitter());
    assert!(farmctl(&farm.url(), &admin, &["queue", "pause", "--reason", "maintenance"]).status.success());
    let held = submit(farm, &submitter, &(0..6).map(|i| job("held", i)).collect::<Vec<_>>());
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(states(&batch_jobs(farm, &submitter, &held)), vec!["queued"; 6], "nothing leaves a paused queue");
    let cancelled = farmctl(&farm.url(), &submitter, &["jobs", "cancel", "--batch", &held]);
    assert!(cancelled.status.success(), "{}", String::from_utf8_lossy(&cancelled.stderr));
    let later = submit(farm, &submitter, &(0..4).map(|i| job("later", i)).collect::<Vec<_>>());
    assert!(farmctl(&farm.url(), &admin, &["queue", "resume"]).status.success());
    watch_to_the_end(farm, &submitter, &later);
    assert_eq!(states(&batch_jobs(farm, &submitter, &held)), vec!["cancelled"; 6], "a cancelled job stays cancelled");
}

/// A submit token sees its tenant's batches only; another's answers as a
/// missing one does.
fn tenants_see_only_their_own_batches(farm: &dyn Farm) {
    let submitter = farm.submitter();
    let batch = submit(farm, &submitter, &[job("mine", 1)]);
    let other = make_token(&farm.url(), &farm.admin(), "bob", "submit");
    let refused = farmctl(&farm.url(), &other, &["batch", &batch]);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success() && stderr.contains("not found"), "{stderr}");
    let deadline = Instant::now() + Duration::from_secs(120);
    while states(&batch_jobs(farm, &submitter, &batch)) != ["succeeded"] {
        assert!(Instant::now() < deadline, "the job did not render");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Each scenario, once per kind of farm.
macro_rules! on_both_farms {
    ($($scenario:ident),* $(,)?) => {
        mod production {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $scenario() {
                super::$scenario(&super::Production::start().await)
            })*
        }
        mod dev {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $scenario() {
                super::$scenario(&super::Dev::start().await)
            })*
        }
    };
}

on_both_farms!(
    a_batch_renders_each_job_once_and_comes_back_with_a_contact_sheet,
    a_paused_queue_holds_work_that_cancel_removes_and_resume_releases,
    tenants_see_only_their_own_batches,
);
