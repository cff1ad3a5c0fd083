//! `flowfarm dev` as a new user meets it: the README's first command on a
//! machine where Postgres and Redis cannot be reached. It renders the demo
//! grid, serves the status page and answers farmctl; stopped with Ctrl-C it
//! exits 0, and started again it still has the same jobs.

mod common;

use std::time::Duration;

use common::dev::DevFarm;
use common::*;
use serde_json::Value;

fn job_ids(listed: &Value) -> Vec<String> {
    listed.as_array().expect("a list of jobs").iter().map(|j| j["id"].as_str().expect("job id").to_owned()).collect()
}

#[test]
fn the_readme_first_command_renders_the_demo_and_keeps_it_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("farm");
    let mut farm = DevFarm::start(&data, 2, &["--demo"]);
    let submitted = farm.wait_line("demo: submitted batch ", Duration::from_secs(60));
    let batch = submitted.split_whitespace().next().expect("the demo batch id").to_owned();
    farm.wait_line("demo: done.", Duration::from_secs(600));

    // farmctl, unchanged, against the embedded farm.
    let listed = ok_json(farmctl(&farm.url, &farm.admin, &["--json", "jobs", "list", "--batch", &batch]));
    let jobs = listed.as_array().unwrap();
    assert_eq!(jobs.len(), 16, "the demo grid: 4 prompts × 4 seeds");
    assert!(jobs.iter().all(|j| j["state"] == "succeeded"), "{listed}");
    let out = dir.path().join("fetched");
    let fetched = farmctl(&farm.url, &farm.admin, &["results", "fetch", &batch, "--out", out.to_str().unwrap(), "--contact-sheet"]);
    assert!(fetched.status.success(), "{}", String::from_utf8_lossy(&fetched.stderr));
    assert_eq!(walk(&out).len(), 17, "16 images and the contact sheet");
    assert_eq!(walk(&data.join("results")).len(), 16, "the results live in the data folder");

    // The status page: the farm's state, the demo batch, a thumbnail.
    let status = http::get(&farm.status_page, "/api/status", &farm.admin);
    assert_eq!(status.status, 200, "{}", status.text());
    assert!(status.text().contains(&batch), "{}", status.text());
    let first = jobs[0]["id"].as_str().unwrap();
    let thumbnail = http::get(&farm.status_page, &format!("/api/jobs/{first}/thumbnail"), &farm.admin);
    assert_eq!((thumbnail.status, thumbnail.header("content-type")), (200, Some("image/png")));

    let before = job_ids(&ok_json(farmctl(&farm.url, &farm.admin, &["--json", "jobs", "list"])));
    let status = farm.stop_with("INT");
    assert!(status.success(), "Ctrl-C drains and exits 0: {status}");

    // Started again over the same folder: the same jobs, and --demo finds
    // its batch instead of submitting another.
    let mut farm = DevFarm::start(&data, 1, &["--demo"]);
    let found = farm.wait_line("demo: found ", Duration::from_secs(60));
    assert!(found.contains(&batch), "{found}");
    let after = job_ids(&ok_json(farmctl(&farm.url, &farm.admin, &["--json", "jobs", "list"])));
    assert_eq!(after, before, "the same jobs after a restart");
    let status = farm.stop_with("TERM");
    assert!(status.success(), "SIGTERM drains and exits 0: {status}");
}

#[test]
fn a_second_dev_farm_on_the_same_folder_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("farm");
    let _first = DevFarm::start(&data, 0, &[]);
    let second = std::process::Command::new(flowfarm_bin())
        .current_dir(repo_path(""))
        .args(["dev", "--data", data.to_str().unwrap(), "--listen", "127.0.0.1:0", "--status-listen", "127.0.0.1:0"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(!second.status.success() && stderr.contains("another `flowfarm dev` is using"), "{stderr}");
}

/// Workers that cannot load their model stop the farm, which says why and
/// exits non-zero, instead of serving a farm that renders nothing.
#[test]
fn a_farm_whose_workers_cannot_load_the_model_stops_and_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let broken = dir.path().join("broken-model");
    std::fs::create_dir_all(&broken).unwrap();
    std::fs::copy(repo_path("models/flowfarm-tiny/model_index.json"), broken.join("model_index.json")).unwrap();
    let out = std::process::Command::new(flowfarm_bin())
        .current_dir(repo_path(""))
        .args(["dev", "--data", dir.path().join("farm").to_str().unwrap(), "--listen", "127.0.0.1:0", "--status-listen", "127.0.0.1:0"])
        .args(["--model", broken.to_str().unwrap()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    let reason = stderr.lines().find(|l| l.starts_with("Error: ")).unwrap_or_else(|| panic!("no error line: {stderr}"));
    assert!(reason.contains("stopped: loading model `flowfarm-tiny`") && reason.contains("transformer"), "{reason}");
}
